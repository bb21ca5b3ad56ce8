//! Which backend `run` would build instances with on this host, and why: the agent's own rule
//! ([`choice::order`]) over what the checks before it found.

use super::{Check, HostView, Status};
use crate::backend::choice;
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
    let passthrough = choice::passthrough(&view.sysfs, &gpus);
    let order = choice::order(view.backend, gpus.len(), &passthrough);
    let ok = |name: &str| earlier.iter().any(|c| c.check == name && c.status == Status::Ok);
    let viable = |kind: &BackendKind| needs(*kind).iter().all(|n| ok(n));
    match order.try_in_order.iter().find(|k| viable(k)) {
        Some(kind) => Check::ok("backend", format!("{} ({})", kind.as_str(), order.reason)),
        None => {
            let wanted: Vec<&str> = order.try_in_order.iter().map(|k| k.as_str()).collect();
            let detail =
                format!("no backend can run ({}; tried {})", order.reason, wanted.join(", "));
            Check::new("backend", Status::Fail, detail, "fix the qemu, ovmf or docker line above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendChoice;

    fn view(root: &std::path::Path, backend: BackendChoice) -> HostView {
        HostView::under(root, backend)
    }

    fn checks(statuses: &[(&'static str, Status)]) -> Vec<Check> {
        statuses.iter().map(|(name, status)| Check::new(name, *status, "", "")).collect()
    }

    #[test]
    fn the_first_backend_whose_checks_pass_is_shown_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sys/bus/pci/devices")).unwrap();
        let qemu_ok = [("qemu", Status::Ok), ("qemu-img", Status::Ok), ("ovmf", Status::Ok)];
        let c = backend(&view(root.path(), BackendChoice::Auto), &checks(&qemu_ok));
        assert_eq!(c.status, Status::Ok);
        assert!(c.detail.starts_with("qemu (auto: no GPUs to offer"), "{}", c.detail);

        let docker_only = [("qemu", Status::Warn), ("docker", Status::Ok)];
        let c = backend(&view(root.path(), BackendChoice::Auto), &checks(&docker_only));
        assert!(c.detail.starts_with("docker (auto: no GPUs to offer"), "{}", c.detail);

        let c = backend(&view(root.path(), BackendChoice::Docker), &checks(&qemu_ok));
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.detail, "no backend can run (QUDATA_BACKEND=docker; tried docker)");
    }
}
