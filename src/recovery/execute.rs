//! Carrying out a [`Plan`]: orphans stopped (all at once, each with its own deadlines), then
//! leaked files removed, then GPUs returned (only once no orphan QEMU can still hold them).
//! Records are the caller's: the agent hands them to the instance manager, `recover` applies
//! them to the store ([`apply_records`]). A failure marks its row and the rest goes on.

use std::sync::Arc;

use futures_util::future::join_all;

use super::plan::{Plan, Row, Subject};
use crate::backend::{HostSweeper, Owned};
use crate::config::Config;
use crate::instance::Manager;
use crate::instance::store::Store;

const NO_BACKEND: &str = "no backend can run on this host";

/// How a process found by [`HostSweeper::find_owned`] is stopped.
#[derive(Clone, Copy)]
enum Stop {
    /// An orphan: stopped and everything it made removed.
    Reap,
    /// A recorded instance's, for host maintenance: stopped, its disk kept.
    Halt,
}

/// Stops every orphan of the plan, all at once.
pub async fn reap_orphans(plan: &mut Plan, backends: &[Arc<dyn HostSweeper>]) {
    let failures = stop_all(&plan.orphans, backends, Stop::Reap).await;
    for (what, error) in failures {
        tracing::error!(%what, %error, "cannot stop an orphan");
        mark(&mut plan.rows, Subject::Process, &what, error);
    }
}

/// Stops the processes of the instances the plan halts (`recover --stop-all`), all at once;
/// their records and disks are kept.
pub async fn halt_instances(plan: &mut Plan, backends: &[Arc<dyn HostSweeper>]) {
    let failures = stop_all(&plan.halt, backends, Stop::Halt).await;
    for (what, error) in failures {
        tracing::error!(%what, %error, "cannot stop an instance");
        mark(&mut plan.rows, Subject::Process, &what, error);
    }
}

/// Each backend stops each process: stopping is idempotent and finds only its own kind (a
/// QEMU backend finds no container), so no process needs to remember who found it. Returns
/// the failures as (what, error).
async fn stop_all(
    list: &[Owned],
    backends: &[Arc<dyn HostSweeper>],
    how: Stop,
) -> Vec<(String, String)> {
    let stop = |o: &Owned| {
        let o = o.clone();
        async move {
            if backends.is_empty() {
                return Err(NO_BACKEND.to_owned());
            }
            for backend in backends {
                let done = match how {
                    Stop::Reap => backend.reap(&o).await,
                    Stop::Halt => backend.halt(&o).await,
                };
                done.map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    };
    let results: Vec<Result<(), String>> = join_all(list.iter().map(stop)).await;
    list.iter().zip(results).filter_map(|(o, r)| r.err().map(|e| (o.what.clone(), e))).collect()
}

/// Instances whose orphan or halted process could not be stopped: it may still hold its GPUs,
/// so those stay on vfio-pci.
fn still_running(plan: &Plan) -> Vec<String> {
    let failed = |o: &&Owned| {
        plan.rows
            .iter()
            .any(|r| r.subject == Subject::Process && r.name == o.what && r.failed.is_some())
    };
    plan.orphans.iter().chain(&plan.halt).filter(failed).map(|o| o.instance_id.clone()).collect()
}

/// Removes the leaked files of the plan, then each instance folder that this left empty.
pub fn remove_files(plan: &mut Plan, cfg: &Config) {
    let vm_roots = [cfg.data_dir.join("vms"), cfg.run_dir.join("vms")];
    for path in plan.remove.clone() {
        let result = match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::error!(path = %path.display(), %error, "cannot remove a leaked file");
            mark(&mut plan.rows, Subject::File, &path.display().to_string(), error);
            continue;
        }
        // Only a folder of the layout, and only when nothing is left in it.
        if let Some(dir) = path.parent().filter(|d| vm_roots.iter().any(|r| d.parent() == Some(r)))
        {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Returns the devices of the plan's bind records to their original drivers.
pub async fn return_gpus(plan: &mut Plan, cfg: &Config) {
    let running = still_running(plan);
    for instance in plan.return_gpus.clone() {
        let devices: Vec<String> =
            plan.gpu_rows.iter().filter(|(i, _)| *i == instance).map(|(_, a)| a.clone()).collect();
        if running.contains(&instance) {
            // Unbinding a device a live QEMU still has open would hang or worse.
            for gpu in &devices {
                let error = "kept on vfio-pci: its QEMU could not be stopped".to_owned();
                mark(&mut plan.rows, Subject::Gpu, gpu, error);
            }
            continue;
        }
        let failures: Vec<(String, String)> = match super::gpus::release(cfg, &instance).await {
            Ok(outcomes) => outcomes.into_iter().filter_map(|(a, e)| Some((a, e?))).collect(),
            Err(error) => devices.iter().map(|a| (a.clone(), error.clone())).collect(),
        };
        for (address, error) in failures {
            tracing::error!(%instance, %address, %error, "cannot return a device to its driver");
            // An audio function or peer has no row of its own: its GPU's rows say it.
            if plan.rows.iter().any(|r| r.subject == Subject::Gpu && r.name == address) {
                mark(&mut plan.rows, Subject::Gpu, &address, error);
            } else {
                for gpu in &devices {
                    mark(&mut plan.rows, Subject::Gpu, gpu, format!("{address}: {error}"));
                }
            }
        }
    }
}

/// `recover`'s side of the records (the agent is not running): the instance manager's own
/// tasks carry out each decision, offline (no backend runs instances; each kind's sweeper
/// tears down), minus adoption and boots (left to the agent).
pub async fn apply_records(plan: &mut Plan, backends: &[Arc<dyn HostSweeper>], store: &Store) {
    let manager = Manager::offline(store.clone(), backends.to_vec());
    let outcomes = manager.restore_offline(plan.records.clone()).await;
    for (id, outcome) in outcomes {
        if let Err(error) = outcome {
            tracing::error!(%id, %error, "cannot recover an instance");
            let name = format!("instance {id}");
            mark(&mut plan.rows, Subject::Instance, &name, error.to_string());
        }
    }
}

fn mark(rows: &mut [Row], subject: Subject, name: &str, error: String) {
    if let Some(row) = rows.iter_mut().find(|r| r.subject == subject && r.name == name) {
        row.failed = Some(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::plan::Action;

    #[test]
    fn a_process_that_did_not_stop_keeps_its_gpus() {
        let owned =
            |id: &str, pid: u32| Owned { instance_id: id.into(), what: format!("QEMU pid {pid}") };
        let row = |name: &str, failed: Option<&str>| Row {
            subject: Subject::Process,
            name: name.into(),
            action: Action::Stopped,
            why: String::new(),
            failed: failed.map(str::to_owned),
        };
        let plan = Plan {
            orphans: vec![owned("a", 1), owned("b", 2)],
            halt: vec![owned("c", 3)],
            rows: vec![
                row("QEMU pid 1", Some("still runs after SIGKILL")),
                row("QEMU pid 2", None),
                row("QEMU pid 3", Some("still runs after SIGKILL")),
            ],
            ..Plan::default()
        };
        assert_eq!(still_running(&plan), ["a", "c"]);
    }
}
