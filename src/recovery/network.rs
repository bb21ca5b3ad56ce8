//! The guests' network in recovery: exactly the recorded instances are on the agent's bridges.
//! Taps go with their QEMU, so what can be left over is a tap nothing holds, and the bridge,
//! dnsmasq and tables once no instance is left; the records say what stays.

use super::plan::{Action, Row, Subject};
use crate::instance::model::{BackendKind, Instance};
use crate::network::HostNetwork;
use crate::network::host::Members;

/// Who is on the bridges according to `records` (deleting ones too: their teardown takes them
/// off once their process is gone).
pub fn members(network: &HostNetwork, records: &[Instance]) -> Members {
    let mut members = Members::default();
    for record in records {
        match (&record.network, record.backend) {
            (Some(guest), _) => {
                // Kept all the same: removing its tap would cut a running VM off.
                if !network.fits(guest) {
                    tracing::warn!(
                        id = %record.id, tap = %guest.tap, address = %guest.address,
                        "the instance's network does not fit QUDATA_VM_SUBNET/QUDATA_VM_BRIDGE \
                         any more; delete and create it again to move it"
                    );
                }
                members.vms.insert(record.id.clone(), guest.clone());
            }
            (None, BackendKind::Docker) => {
                members.containers.insert(record.id.clone());
            }
            (None, BackendKind::Qemu) => {}
        }
    }
    members
}

/// `recover`'s rows: each recorded VM's tap and address (kept), each tap no record owns, and
/// the bridge, dnsmasq and tables when no instance needs them (removed).
pub async fn rows(network: &HostNetwork, members: &Members) -> Vec<Row> {
    let found = network.inspect().await;
    let row = |name: String, action, why: String| Row {
        subject: Subject::Network,
        name,
        action,
        why,
        failed: None,
    };
    let mut rows = Vec::new();
    for (id, guest) in &members.vms {
        let state = if found.taps.contains(&guest.tap) { "up" } else { "made at its next start" };
        let name = format!("tap {} {}", guest.tap, guest.address);
        rows.push(row(name, Action::Kept, format!("instance {id} ({state})")));
    }
    let owned: Vec<&str> = members.vms.values().map(|g| g.tap.as_str()).collect();
    for tap in found.taps.iter().filter(|t| !owned.contains(&t.as_str())) {
        rows.push(row(format!("tap {tap}"), Action::Removed, "no instance owns it".into()));
    }
    let settings = network.settings();
    if members.vms.is_empty() {
        let why = || "no VM is left on it".to_owned();
        if found.bridge {
            rows.push(row(format!("bridge {}", settings.bridge), Action::Removed, why()));
        }
        if let Some(pid) = found.dnsmasq {
            rows.push(row(format!("dnsmasq pid {pid}"), Action::Removed, why()));
        }
    }
    let table = format!("nftables {}", settings.table());
    if members.is_empty() {
        if found.table {
            rows.push(row(table, Action::Removed, "no instance is left".into()));
        }
    } else {
        let why = format!("{} VM(s), {} container(s)", members.vms.len(), members.containers.len());
        rows.push(row(table, Action::Kept, why));
    }
    rows
}

/// Makes the host match `members`, marking the rows on failure.
pub async fn apply(network: &HostNetwork, members: Members, rows: &mut [Row]) {
    if let Err(e) = network.restore(members).await {
        tracing::error!(error = %e, "cannot reconcile the guests' network");
        for row in rows.iter_mut().filter(|r| r.subject == Subject::Network) {
            row.failed = Some(e.to_string());
        }
    }
}
