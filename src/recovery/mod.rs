//! Recovery (PROTOCOL.md §4): after a crash or restart, bring the host back in line with the
//! records, adopting what lives and cleaning up what nothing claims.
//!
//! Three steps, so the policy is a pure function with table tests:
//! 1. [`facts`]: look (records, what carries the agent's marker, the layout's files, the GPUs
//!    in the bind record, the lease from `/init`);
//! 2. [`plan::plan`]: decide, with a reason per row;
//! 3. [`execute`]: act. The agent does it at start-up before it serves ([`at_startup`]), again
//!    for the lease once `/init` answers ([`apply_lease`]); `qudata-agent recover` does it once
//!    from the command line ([`command`]). [`lock::RunLock`] keeps the two apart.

mod execute;
pub mod facts;
pub mod gpus;
pub mod lock;
mod network;
pub mod plan;
pub mod report;
mod tunnels;

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{BackendError, HostSweeper};
use crate::config::Config;
use crate::instance::model::Instance;
use crate::instance::store::{Store, StoreError};
use crate::instance::{Manager, ManagerError};
use crate::network::HostNetwork;
use facts::Facts;
use lock::{LockError, RunLock};
use plan::{Mode, Plan};
use report::Report;

/// Recovery could not run at all (a single action failing is a row of the report instead).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("cannot list what the agent runs on this host: {0}")]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot read the instance records: {0}")]
    Manager(#[from] ManagerError),
    #[error("cannot read the instance records: {0}")]
    Store(#[from] StoreError),
}

/// How long `recover` waits for a running agent (or another `recover`) to let go of the lock.
pub const COMMAND_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long a starting agent waits for a `recover` in progress to finish.
pub const AGENT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Looks at the host.
pub async fn survey(
    records: Vec<Instance>,
    backends: &[Arc<dyn HostSweeper>],
    cfg: &Config,
    lease: Option<bool>,
) -> Result<Facts, RecoveryError> {
    let mut owned = Vec::new();
    for backend in backends {
        owned.extend(backend.find_owned().await?);
    }
    let include_dir = crate::tunnel::config::include_dir(&cfg.frpc_config);
    let files = facts::scan_files(&cfg.data_dir, &cfg.run_dir, Some(&include_dir));
    Ok(Facts { records, owned, files, bound_gpus: gpus::bound(cfg), lease })
}

fn log_plan(plan: &Plan) {
    for row in &plan.rows {
        tracing::info!(what = %row.name, action = ?row.action, why = %row.why, "recovery");
    }
}

/// Orphans, leaked files and GPUs: the part both callers share.
async fn clean_up(plan: &mut Plan, backends: &[Arc<dyn HostSweeper>], cfg: &Config) {
    execute::reap_orphans(plan, backends).await;
    execute::remove_files(plan, cfg);
    execute::return_gpus(plan, cfg).await;
}

/// The agent's start-up reconciliation, before the API serves. `backends` find and reap
/// orphans (the manager's, and ones good only for cleaning up, one per kind).
/// Returns the ids of the records it restored, for [`apply_lease`].
pub async fn at_startup(
    manager: &Manager,
    backends: &[Arc<dyn HostSweeper>],
    network: &HostNetwork,
    cfg: &Config,
) -> Result<Vec<String>, RecoveryError> {
    let records = manager.stored_records()?;
    let members = network::members(network, &records);
    let facts = survey(records, backends, cfg, None).await?;
    let mut plan = plan::plan(&facts, Mode::Agent);
    plan.rows.extend(network::rows(network, &members).await);
    log_plan(&plan);
    let ids = plan.records.iter().map(|(i, _)| i.id.clone()).collect();
    // Orphans first: a QEMU with no record must not hold a GPU a record is about to get.
    execute::reap_orphans(&mut plan, backends).await;
    // Then the network, before any VM is adopted or booted: every recorded VM keeps (or
    // gets back) its rules and DHCP entry, and what no record owns goes.
    network::apply(network, members, &mut plan.rows).await;
    manager.restore_with(std::mem::take(&mut plan.records)).await;
    execute::remove_files(&mut plan, cfg);
    execute::return_gpus(&mut plan, cfg).await;
    Ok(ids)
}

/// `/init` answered with `instance_running`: the same policy again, with the lease, for the
/// instances restored at start-up (never for ones created since).
pub async fn apply_lease(
    manager: &Manager,
    backends: &[Arc<dyn HostSweeper>],
    cfg: &Config,
    restored: &[String],
    running: bool,
) -> Result<(), RecoveryError> {
    let records: Vec<Instance> =
        manager.instances().into_iter().filter(|i| restored.contains(&i.id)).collect();
    if records.is_empty() {
        return Ok(());
    }
    let facts = survey(records, backends, cfg, Some(running)).await?;
    for (instance, restore) in plan::plan(&facts, Mode::Agent).records {
        manager.apply_lease(&instance.id, restore).await;
    }
    Ok(())
}

/// `qudata-agent recover [--dry-run] [--stop-all]`: the reconciliation once, without a control
/// plane; with `stop_all` (host maintenance) every live instance and frpc are stopped too.
pub async fn command(
    cfg: &Config,
    backends: &[Arc<dyn HostSweeper>],
    network: &HostNetwork,
    dry_run: bool,
    stop_all: bool,
    lock_wait: Duration,
) -> Result<Report, RecoveryError> {
    // A dry run changes nothing, so it does not need the agent to stop; it says if it runs.
    let (_lock, note) = if dry_run {
        let note = RunLock::held_by_other(&cfg.run_dir)
            .map(|h| format!("Note: {h} holds the lock; it may be changing things meanwhile."));
        (None, note)
    } else {
        (Some(RunLock::acquire(&cfg.run_dir, "recover", lock_wait).await?), None)
    };
    // A dry run on a host the agent never ran on creates nothing, not even the records dir.
    let store = match dry_run && !cfg.data_dir.join("instances").is_dir() {
        true => None,
        false => Some(Store::open(&cfg.data_dir)?),
    };
    let records = match &store {
        Some(store) => store.load_all()?,
        None => Vec::new(),
    };
    let facts = survey(records, backends, cfg, None).await?;
    let mode = if stop_all { Mode::StopAll } else { Mode::Command };
    let mut plan = plan::plan(&facts, mode);
    let frpc = stop_all.then(|| tunnels::running(cfg)).flatten();
    if let Some(pid) = frpc {
        plan.rows.push(tunnels::row(pid));
    }
    // What stays on the bridges: the records that this run keeps (not removed, not deleted).
    let kept: Vec<Instance> = plan
        .records
        .iter()
        .filter(|(_, restore)| *restore != crate::instance::Restore::TearDown)
        .map(|(i, _)| i.clone())
        .collect();
    plan.rows.extend(network::rows(network, &network::members(network, &kept)).await);
    if let Some(store) = store.filter(|_| !dry_run) {
        log_plan(&plan);
        // Before the records say `error`: a failed stop leaves its row marked, the record too.
        execute::halt_instances(&mut plan, backends).await;
        execute::apply_records(&mut plan, backends, &store).await;
        clean_up(&mut plan, backends, cfg).await;
        // After the teardowns: the records left are the truth.
        let left = store.load_all().unwrap_or(kept);
        network::apply(network, network::members(network, &left), &mut plan.rows).await;
        if let Some(pid) = frpc {
            tunnels::stop(cfg, pid, &mut plan.rows).await;
        }
        plan.rows.extend(gpus::retry_quarantined(cfg).await);
    }
    plan.rows.extend(gpus::quarantined_rows(cfg));
    Ok(Report { dry_run, rows: plan.rows, note })
}
