//! The operations that run under an instance's `op` lock, mostly in the background.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use super::{Manager, ManagerError, Slot};
use crate::backend::BackendError;
use crate::instance::transition::{Event, Flow};

/// Proof that the instance's operation lock is held.
pub(super) type OpGuard = OwnedMutexGuard<()>;

/// Runs a background flow to its end, recording the outcome in the instance's status.
pub(super) async fn run(manager: &Manager, slot: &Arc<Slot>, flow: Flow, _guard: OpGuard) {
    let id = slot.snapshot().id;
    let result = match flow {
        Flow::Delete => return delete(manager, slot).await,
        Flow::Create => launch_and_bring_up(manager, slot).await,
        Flow::Boot => step(manager, slot, "boot").await,
        Flow::Reset => step(manager, slot, "reset").await,
        Flow::Settle => bring_up(manager, slot).await,
        Flow::Reconfigure => configure(manager, slot).await,
        Flow::Pause | Flow::Resume => Ok(Some(())),
    };
    match result {
        Ok(Some(())) => match manager.apply(slot, &Event::Ready).await {
            Ok(_) => tracing::info!(%id, ?flow, "instance running"),
            Err(e) => tracing::error!(%id, error = %e, "cannot record the running state"),
        },
        Ok(None) => tracing::info!(%id, ?flow, "stopped waiting: the instance is being deleted"),
        Err(e) => {
            tracing::warn!(%id, ?flow, error = %e, "instance operation failed");
            if flow == Flow::Create {
                rollback(manager, slot).await;
            }
            if let Err(save) = manager.apply(slot, &Event::Failed(e.to_string())).await {
                tracing::error!(%id, error = %save, "cannot record the failure");
            }
        }
    }
}

/// `Ok(None)`: cancelled by a `DELETE`.
type FlowResult = Result<Option<()>, BackendError>;

async fn launch_and_bring_up(manager: &Manager, slot: &Arc<Slot>) -> FlowResult {
    let backend = manager.backend().map_err(|e| BackendError::op("create", e))?;
    if *slot.cancel.borrow() {
        return Ok(None);
    }
    backend.launch(&slot.snapshot()).await?;
    // The guest boots meanwhile; a port that cannot be published does not fail the instance.
    manager.publish_ports(slot).await;
    crate::fault::crash_point(crate::fault::Phase::BeforeGuestAnswers);
    bring_up(manager, slot).await
}

async fn step(manager: &Manager, slot: &Arc<Slot>, what: &'static str) -> FlowResult {
    let backend = manager.backend().map_err(|e| BackendError::op(what, e))?;
    let instance = slot.snapshot();
    match what {
        "reset" => backend.reset(&instance).await?,
        _ => backend.boot(&instance).await?,
    }
    bring_up(manager, slot).await
}

/// Waits for the guest (giving up when the instance is deleted), then configures it.
async fn bring_up(manager: &Manager, slot: &Arc<Slot>) -> FlowResult {
    let backend = manager.backend().map_err(|e| BackendError::op("boot", e))?;
    let mut cancel = slot.cancel.subscribe();
    let instance = slot.snapshot();
    tokio::select! {
        ready = backend.wait_ready(&instance) => ready?,
        _ = cancel.wait_for(|c| *c) => return Ok(None),
    }
    configure(manager, slot).await
}

async fn configure(manager: &Manager, slot: &Arc<Slot>) -> FlowResult {
    let backend = manager.backend().map_err(|e| BackendError::op("configure", e))?;
    if *slot.cancel.borrow() {
        return Ok(None);
    }
    // Fresh snapshot: keys added while the guest was booting are included.
    backend.configure(&slot.snapshot()).await?;
    Ok(Some(()))
}

async fn rollback(manager: &Manager, slot: &Arc<Slot>) {
    let instance = slot.snapshot();
    // The published ports would otherwise point at host ports nothing holds any more.
    manager.unpublish_ports(&instance.id).await;
    if let Err(e) = manager.tear_down_instance(&instance).await {
        tracing::error!(id = %instance.id, error = %e, "rollback of a failed create is incomplete");
    }
}

/// How many times a `DELETE` tries the teardown (2 s, doubling, between tries: about a minute).
const DESTROY_ATTEMPTS: u32 = 5;

async fn delete(manager: &Manager, slot: &Arc<Slot>) {
    let instance = slot.snapshot();
    manager.unpublish_ports(&instance.id).await;
    // A transient failure (an engine call timing out, a device slow to let go) must not
    // leave the host blocked until the next restart: a teardown is idempotent, so retry.
    // Forgetting the record would leave a VM or container running that nothing tracks: on
    // giving up it stays (marked deleting) for the next start-up or `recover`.
    let mut wait = Duration::from_secs(2);
    let mut attempt = 1;
    while let Err(e) = manager.tear_down_instance(&instance).await {
        if attempt == DESTROY_ATTEMPTS || matches!(e, ManagerError::NoBackend { .. }) {
            // The record stays (marked deleting): the next start-up or `recover` retries.
            tracing::error!(id = %instance.id, error = %e, attempt, "instance teardown failed; giving up until the next start-up or `recover`");
            return;
        }
        tracing::warn!(id = %instance.id, error = %e, attempt, retry_in_s = wait.as_secs(), "instance teardown failed; retrying");
        tokio::time::sleep(wait).await;
        wait *= 2;
        attempt += 1;
    }
    match manager.forget(&instance.id) {
        Ok(()) => tracing::info!(id = %instance.id, "instance deleted"),
        Err(e) => tracing::error!(id = %instance.id, error = %e, "cannot remove the record"),
    }
}

/// Pause or resume, answered synchronously.
pub(super) async fn run_quick(
    manager: &Manager,
    slot: &Arc<Slot>,
    flow: Flow,
    _guard: OpGuard,
) -> Result<(), ManagerError> {
    let backend = manager.backend()?;
    let instance = slot.snapshot();
    if flow == Flow::Pause {
        backend.pause(&instance).await?;
        return manager.apply(slot, &Event::Paused).await.map(drop);
    }
    backend.resume(&instance).await?;
    manager.apply(slot, &Event::Resumed).await?;
    // Keys changed while the vCPUs were stopped are applied now.
    if let Err(e) = backend.apply_ssh_keys(&slot.snapshot()).await {
        tracing::warn!(id = %instance.id, error = %e, "cannot apply SSH keys after resume");
    }
    Ok(())
}

/// Applies the record's keys to a running guest.
pub(super) async fn apply_keys_now(
    manager: &Manager,
    slot: &Arc<Slot>,
) -> Result<(), ManagerError> {
    // Bounded like a lifecycle command: the caller puts the record back on a refusal.
    let _guard = tokio::time::timeout(super::OP_WAIT, Arc::clone(&slot.op).lock_owned())
        .await
        .map_err(|_| crate::instance::transition::Conflict {
            status: slot.snapshot().status,
            reason: "another operation on the instance is in progress; try again".to_owned(),
        })?;
    let instance = slot.snapshot();
    if instance.status != crate::instance::model::Status::Running {
        return Ok(()); // applied when the guest is reachable again
    }
    manager.backend()?.apply_ssh_keys(&instance).await?;
    Ok(())
}
