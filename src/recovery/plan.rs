//! The recovery policy of PROTOCOL.md §4 as a pure function: [`Facts`] in, a [`Plan`] out
//! (what to do with each record, process, file and GPU, and why). Nothing here touches the
//! host, so every rule has a table test.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;

use super::facts::{Facts, FileKind};
use crate::backend::Owned;
use crate::instance::Restore;
use crate::instance::model::{BackendKind, Instance, Status};

/// Who runs the reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The agent at start-up: it adopts what lives.
    Agent,
    /// `qudata-agent recover`: leaves live instances to the agent.
    Command,
    /// `qudata-agent recover --stop-all` (host maintenance): stops every live instance too,
    /// keeping its record and disk.
    StopAll,
}

/// The kind of thing a row is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Instance,
    Process,
    File,
    Gpu,
    /// A tap, the agent's bridge, its dnsmasq or its nftables tables.
    Network,
}

/// What is (or, with `--dry-run`, would be) done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Adopted,
    Kept,
    Stopped,
    Removed,
    Returned,
    Rebooted,
    /// The record goes to `error` with the reason in `why`.
    Error,
    /// A GPU not offered until it is checked (`why`: the reason and since when).
    Quarantined,
}

/// One line of `recover`'s table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub subject: Subject,
    /// `instance <id>`, `QEMU pid 1234`, a path, a PCI address.
    pub name: String,
    pub action: Action,
    pub why: String,
    /// Set by the executor when the action failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// What to do, and the rows that say it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub records: Vec<(Instance, Restore)>,
    pub orphans: Vec<Owned>,
    /// Files of instances no record claims, removed after the orphans are stopped.
    pub remove: Vec<PathBuf>,
    /// Instances whose bind record is released (their devices back to the host drivers).
    pub return_gpus: Vec<String>,
    /// (instance, PCI address) of every device in a bind record, for the executor's rows.
    pub gpu_rows: Vec<(String, String)>,
    /// Processes of recorded instances stopped for maintenance (their records kept).
    pub halt: Vec<Owned>,
    pub rows: Vec<Row>,
}

const GONE: &str = "the VM exited while the agent was down";
/// The record's error after `recover --stop-all`.
pub const STOPPED: &str =
    "stopped for host maintenance (recover --stop-all); its disk is kept: start boots it again";
const CUT_SHORT: &str = "the agent stopped while the instance was being created, before its VM \
     ran; what the create made is removed — delete the instance and create it again";

/// What was found of one record's instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Its process or container carries the marker now.
    pub alive: bool,
    /// Its disk is there to boot from.
    pub has_disk: bool,
    /// It has run at least once (QEMU: its serial log exists). A `pending` record that never
    /// ran is a create cut short, safe to roll back; one that ran may be a boot from the
    /// renter's disk, which is never removed without a `DELETE`.
    pub has_run: bool,
}

/// The decision for one record (PROTOCOL.md §4), and why.
pub fn decide(record: &Instance, seen: Seen, lease: Option<bool>) -> (Restore, String) {
    let (status, has_disk) = (record.status, seen.has_disk);
    let (restore, why) = match (seen.alive, lease) {
        _ if record.deleting => (Restore::TearDown, "its deletion was interrupted".to_owned()),
        (_, Some(false)) => {
            (Restore::TearDown, "the control plane says the lease is over".to_owned())
        }
        (true, _) if status == Status::Error => {
            (Restore::Keep, "in error; DELETE stops its process".to_owned())
        }
        (true, _) => (Restore::Adopt, format!("its process is alive ({status})")),
        (false, _) if status == Status::Pending && !seen.has_run => {
            (Restore::RollBack { reason: CUT_SHORT.to_owned() }, CUT_SHORT.to_owned())
        }
        (false, Some(true)) if has_disk => {
            (Restore::Reboot, "gone, but the control plane says the lease goes on".to_owned())
        }
        (false, _) if status == Status::Error => (Restore::Keep, "already in error".to_owned()),
        (false, Some(true)) => {
            let reason = format!("{GONE}, and its disk is missing");
            (Restore::Gone { reason: reason.clone() }, reason)
        }
        (false, None) => (Restore::Gone { reason: GONE.to_owned() }, GONE.to_owned()),
    };
    (restore, why)
}

/// The plan for `facts`.
pub fn plan(facts: &Facts, mode: Mode) -> Plan {
    let mut plan = Plan::default();
    let claimed: BTreeSet<&str> = facts.records.iter().map(|r| r.id.as_str()).collect();
    let alive = |id: &str| facts.owned.iter().any(|o| o.instance_id == id);
    // Ids whose VM lives on (or will again): their GPUs stay on vfio-pci.
    let mut using_gpus: BTreeSet<String> = BTreeSet::new();
    let mut teardown: BTreeSet<&str> = BTreeSet::new();

    for record in &facts.records {
        let id = record.id.as_str();
        let has = |kind| facts.files.iter().any(|f| f.id.as_deref() == Some(id) && f.kind == kind);
        // A container's disk is the engine's business: never rolled back, booted by the backend.
        let docker = record.backend == BackendKind::Docker;
        let seen = Seen {
            alive: alive(id),
            has_disk: docker || has(FileKind::Overlay),
            has_run: docker || has(FileKind::SerialLog),
        };
        let (mut restore, mut why) = decide(record, seen, facts.lease);
        if mode == Mode::StopAll && seen.alive && matches!(restore, Restore::Adopt | Restore::Keep)
        {
            restore = Restore::Gone { reason: STOPPED.to_owned() };
            why = STOPPED.to_owned();
            plan.halt.extend(facts.owned.iter().filter(|o| o.instance_id == id).cloned());
        }
        let action = match &restore {
            Restore::Gone { .. } if mode == Mode::StopAll && seen.alive => Action::Stopped,
            Restore::Adopt if mode != Mode::Agent => Action::Kept,
            Restore::Adopt => Action::Adopted,
            Restore::Keep => Action::Kept,
            Restore::Gone { .. } => Action::Error,
            Restore::RollBack { .. } => Action::Removed,
            Restore::Reboot => Action::Rebooted,
            Restore::TearDown => Action::Stopped,
        };
        let why = match (&restore, mode) {
            (Restore::Adopt, Mode::Command | Mode::StopAll) => {
                format!("{why}; the agent adopts it when it starts")
            }
            _ => why,
        };
        match restore {
            Restore::Adopt | Restore::Reboot => {
                using_gpus.insert(record.id.clone());
            }
            Restore::Keep if alive(id) => {
                using_gpus.insert(record.id.clone());
            }
            Restore::TearDown => {
                teardown.insert(id);
            }
            _ => {}
        }
        plan.rows.push(row(Subject::Instance, format!("instance {id}"), action, why));
        plan.records.push((record.clone(), restore));
    }

    for owned in &facts.owned {
        let id = owned.instance_id.as_str();
        let (action, why) = match plan.records.iter().find(|(r, _)| r.id == id) {
            None => {
                plan.orphans.push(owned.clone());
                (Action::Stopped, format!("carries the marker of {id}, which has no record"))
            }
            Some((_, Restore::TearDown)) => {
                (Action::Stopped, format!("instance {id} is torn down"))
            }
            Some(_) if plan.halt.contains(owned) => {
                (Action::Stopped, format!("instance {id}'s, stopped for host maintenance"))
            }
            Some((_, Restore::Adopt)) if mode == Mode::Agent => {
                (Action::Adopted, format!("instance {id}'s"))
            }
            Some(_) => (Action::Kept, format!("instance {id}'s")),
        };
        plan.rows.push(row(Subject::Process, owned.what.clone(), action, why));
    }

    for file in &facts.files {
        let name = file.path.display().to_string();
        let (action, why) = match (&file.id, file.kind) {
            (_, FileKind::Foreign) => (Action::Kept, "not a file the agent makes".to_owned()),
            (Some(id), _) if teardown.contains(id.as_str()) => {
                (Action::Removed, format!("with instance {id}, which is torn down"))
            }
            (Some(id), _) if claimed.contains(id.as_str()) => {
                let rolled_back = plan
                    .records
                    .iter()
                    .any(|(r, a)| r.id == *id && matches!(a, Restore::RollBack { .. }));
                if rolled_back {
                    (Action::Removed, format!("with instance {id}'s interrupted create"))
                } else {
                    (Action::Kept, format!("instance {id}'s"))
                }
            }
            (Some(id), _) => {
                plan.remove.push(file.path.clone());
                (Action::Removed, format!("left by instance {id}, which has no record"))
            }
            (None, _) => (Action::Kept, "not a file the agent makes".to_owned()),
        };
        plan.rows.push(row(Subject::File, name, action, why));
    }

    for gpu in &facts.bound_gpus {
        let id = gpu.instance.as_str();
        let (action, why) = if using_gpus.contains(id) {
            (Action::Kept, format!("on vfio-pci for instance {id}"))
        } else if teardown.contains(id) {
            (Action::Returned, format!("with instance {id}'s teardown"))
        } else if plan.halt.iter().any(|o| o.instance_id == id) {
            if !plan.return_gpus.iter().any(|i| i == id) {
                plan.return_gpus.push(id.to_owned());
            }
            (Action::Returned, format!("with instance {id}, stopped for host maintenance"))
        } else {
            if !plan.return_gpus.iter().any(|i| i == id) {
                plan.return_gpus.push(id.to_owned());
            }
            (Action::Returned, format!("bound for instance {id}, which has no live VM"))
        };
        plan.gpu_rows.push((id.to_owned(), gpu.address.clone()));
        plan.rows.push(row(Subject::Gpu, gpu.address.clone(), action, why));
    }
    plan
}

fn row(subject: Subject, name: String, action: Action, why: String) -> Row {
    Row { subject, name, action, why, failed: None }
}

#[cfg(test)]
mod tests;
