//! Which backend `run` would build instances with on this host, and why: the agent's own rule
//! ([`backends::order`]) over what the checks before it found.

use super::{Check, HostView, Status};
use crate::agent::backends;
use crate::gpu::Inventory;
use crate::instance::model::BackendKind;

/// What each backend needs, by check name.
fn needs(kind: BackendKind) -> &'static [&'static str] {
    match kind {
        BackendKind::Qemu => &["qemu", "qemu-img", "ovmf"],
        BackendKind::Docker => &["docker"],
    }
}

/// The choice, from the checks already run (`earlier`).
pub fn backend(view: &HostView, earlier: &[Check]) -> Check {
    let inventory = Inventory::scan(&view.sysfs, view.gpu_pci_addrs.as_deref());
    let gpus: Vec<String> = inventory
        .map(|i| i.gpus.iter().map(|g| g.address.to_string()).collect())
        .unwrap_or_default();
    let passthrough = backends::passthrough(&view.sysfs, &gpus);
    let order = backends::order(view.backend, gpus.len(), &passthrough);
    let ok = |name: &str| earlier.iter().any(|c| c.check == name && c.status == Status::Ok);
    let viable = |kind: &BackendKind| needs(*kind).iter().all(|n| ok(n));
    match order.try_in_order.iter().find(|k| viable(k)) {
        Some(kind) => {
            Check::ok("backend", format!("{} ({})", backends::kind_name(*kind), order.reason))
        }
        None => {
            let wanted: Vec<&str> =
                order.try_in_order.iter().map(|k| backends::kind_name(*k)).collect();
            let detail =
                format!("no backend can run ({}; tried {})", order.reason, wanted.join(", "));
            Check::new("backend", Status::Fail, detail, "fix the qemu, ovmf or docker line above")
        }
    }
}
