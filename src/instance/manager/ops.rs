//! The operations an [`InstanceTask`](super::task::InstanceTask) runs, one at a time: each a
//! future over a [`Context`] (the manager's services, the record as last saved, the
//! deletion signal and the task's machine) that ends in a [`Done`] for the task to record.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Manager, ManagerError};
use crate::backend::{Adoption, BackendError, Machine};
use crate::instance::model::Instance;
use crate::instance::transition::Flow;

/// What a task runs.
#[derive(Clone, Debug)]
pub(super) enum Op {
    Flow(Flow),
    /// Apply the record's renter keys to the running guest (`previous`: what it had).
    Keys {
        previous: Vec<String>,
    },
    /// Reattach after an agent restart.
    Adopt,
    /// Remove what an interrupted create made; the instance is then in error for `reason`.
    RollBack {
        reason: String,
    },
    Publish,
}

/// What an operation works with.
pub(super) struct Context {
    pub manager: Manager,
    pub record: watch::Receiver<Instance>,
    pub cancel: watch::Receiver<bool>,
    /// Set when the agent is about to exit: a deletion stops its VM or container at once.
    pub hurry: watch::Receiver<bool>,
    pub machine: Option<Arc<dyn Machine>>,
}

impl Context {
    /// The record as last saved (keys added while a guest booted included).
    fn instance(&self) -> Instance {
        self.record.borrow().clone()
    }

    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    fn machine(&self, operation: &'static str) -> Result<Arc<dyn Machine>, BackendError> {
        self.machine.clone().ok_or_else(|| BackendError::Gone {
            detail: format!("cannot {operation}: no VM or container runs for the instance"),
        })
    }
}

/// How an operation ended.
pub(super) struct Done {
    /// `Ok(true)`: done; `Ok(false)`: a flow that stopped because the instance is deleted.
    pub result: Result<bool, ManagerError>,
    /// `Some` when the operation made or let go of the instance's machine.
    pub machine: Option<Option<Arc<dyn Machine>>>,
    /// What adoption found.
    pub adoption: Option<Adoption>,
}

impl Done {
    fn of(result: Result<bool, impl Into<ManagerError>>) -> Done {
        Done { result: result.map_err(Into::into), machine: None, adoption: None }
    }
}

pub(super) async fn run(op: Op, context: Context) -> Done {
    match op {
        Op::Flow(Flow::Create) => create(&context).await,
        Op::Flow(Flow::Boot) => boot(&context).await,
        Op::Flow(Flow::Reset) => Done::of(reset(&context).await),
        Op::Flow(Flow::Settle) => Done::of(settle(&context).await),
        Op::Flow(Flow::Reconfigure) => Done::of(configure(&context).await),
        Op::Flow(Flow::Pause) => Done::of(pause(&context, true).await),
        Op::Flow(Flow::Resume) => Done::of(pause(&context, false).await),
        Op::Flow(Flow::Delete) => delete(&context).await,
        Op::Keys { .. } => Done::of(apply_keys(&context).await),
        Op::Adopt => adopt(&context).await,
        Op::RollBack { .. } => {
            let instance = context.instance();
            let result = context.manager.tear_down_instance(&instance, None).await;
            Done { machine: Some(None), ..Done::of(result.map(|()| true)) }
        }
        Op::Publish => {
            context.manager.publish_ports(&context.instance()).await;
            Done::of(Ok::<_, ManagerError>(true))
        }
    }
}

/// Launch, publish, wait for the guest, configure; on failure everything is removed.
async fn create(context: &Context) -> Done {
    let backend = match context.manager.backend() {
        Ok(backend) => backend,
        Err(e) => return Done::of(Err::<bool, _>(e)),
    };
    if context.cancelled() {
        return Done::of(Ok::<_, ManagerError>(false));
    }
    let instance = context.instance();
    let machine = match backend.launch(&instance).await {
        Ok(machine) => machine,
        Err(e) => {
            // The backend removed what it made; torn down again all the same (idempotent),
            // as every failed create is.
            rollback(context, &instance, None).await;
            return Done { machine: Some(None), ..Done::of(Err::<bool, _>(e)) };
        }
    };
    // The guest boots meanwhile; a port that cannot be published does not fail the instance.
    context.manager.publish_ports(&instance).await;
    crate::fault::crash_point(crate::fault::Phase::BeforeGuestAnswers);
    match bring_up(context, &machine).await {
        Ok(done) => Done { machine: Some(Some(machine)), ..Done::of(Ok::<_, ManagerError>(done)) },
        Err(e) => {
            rollback(context, &instance, Some(machine)).await;
            Done { machine: Some(None), ..Done::of(Err::<bool, _>(e)) }
        }
    }
}

async fn rollback(context: &Context, instance: &Instance, machine: Option<Arc<dyn Machine>>) {
    // The published ports would otherwise point at host ports nothing holds any more.
    context.manager.unpublish_ports(&instance.id).await;
    if let Err(e) = context.manager.tear_down_instance(instance, machine).await {
        tracing::error!(id = %instance.id, error = %e, "rollback of a failed create is incomplete");
    }
}

/// Start again from disk after the process is gone.
async fn boot(context: &Context) -> Done {
    let booted = async {
        let backend = context.manager.backend().map_err(|e| BackendError::op("boot", e))?;
        backend.boot(&context.instance()).await
    };
    match booted.await {
        Ok(machine) => {
            let result = bring_up(context, &machine).await;
            Done { machine: Some(Some(machine)), ..Done::of(result) }
        }
        Err(e) => Done::of(Err::<bool, _>(e)),
    }
}

async fn reset(context: &Context) -> Result<bool, BackendError> {
    let machine = context.machine("restart")?;
    machine.reset().await?;
    bring_up(context, &machine).await
}

async fn settle(context: &Context) -> Result<bool, BackendError> {
    bring_up(context, &context.machine("wait for the guest")?).await
}

/// Waits for the guest (giving up when the instance is deleted), then configures it.
async fn bring_up(context: &Context, machine: &Arc<dyn Machine>) -> Result<bool, BackendError> {
    let mut cancel = context.cancel.clone();
    let instance = context.instance();
    tokio::select! {
        ready = machine.wait_ready(&instance) => ready?,
        _ = cancel.wait_for(|c| *c) => return Ok(false),
    }
    configure_on(context, machine).await
}

async fn configure(context: &Context) -> Result<bool, BackendError> {
    configure_on(context, &context.machine("configure")?).await
}

async fn configure_on(context: &Context, machine: &Arc<dyn Machine>) -> Result<bool, BackendError> {
    if context.cancelled() {
        return Ok(false);
    }
    // Fresh copy: keys added while the guest was booting are included.
    machine.configure(&context.instance()).await?;
    Ok(true)
}

async fn pause(context: &Context, pause: bool) -> Result<bool, BackendError> {
    if pause {
        context.machine("stop")?.pause().await?;
        return Ok(true);
    }
    let machine = context.machine("start")?;
    machine.resume().await?;
    // Keys changed while the vCPUs were stopped are applied now.
    let instance = context.instance();
    if let Err(e) = machine.apply_ssh_keys(&instance).await {
        tracing::warn!(id = %instance.id, error = %e, "cannot apply SSH keys after resume");
    }
    Ok(true)
}

async fn apply_keys(context: &Context) -> Result<bool, BackendError> {
    context.machine("apply SSH keys")?.apply_ssh_keys(&context.instance()).await?;
    Ok(true)
}

async fn adopt(context: &Context) -> Done {
    let adopted = async {
        let instance = context.instance();
        let backend = context.manager.lifecycle_of(&instance)?;
        Ok::<_, ManagerError>(backend.adopt(&instance).await?)
    };
    match adopted.await {
        Ok(adoption) => Done { adoption: Some(adoption), ..Done::of(Ok::<_, ManagerError>(true)) },
        Err(e) => Done::of(Err::<bool, _>(e)),
    }
}

/// One teardown; when the agent is about to exit (now or meanwhile), the machine is stopped at
/// once beside it, so the teardown ends within the agent's stop timeout.
async fn tear_down(
    context: &Context,
    instance: &Instance,
    machine: Option<Arc<dyn Machine>>,
) -> Result<(), ManagerError> {
    let mut hurry = context.hurry.clone();
    let held = machine.clone();
    let hurried = async move {
        if hurry.wait_for(|h| *h).await.is_ok()
            && let Some(machine) = held
            && let Err(e) = machine.stop_now().await
        {
            tracing::warn!(error = %e, "cannot stop the instance at once");
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        torn = context.manager.tear_down_instance(instance, machine) => torn,
        () = hurried => unreachable!("never resolves"),
    }
}

/// How many times a deletion tries the teardown (2 s, doubling, between tries: about a
/// minute).
const DESTROY_ATTEMPTS: u32 = 5;

/// Withdraws the ports, tears down (retried), forgets the record. `Ok(true)`: forgotten.
async fn delete(context: &Context) -> Done {
    let instance = context.instance();
    context.manager.unpublish_ports(&instance.id).await;
    // A transient failure (an engine call timing out, a device slow to let go) must not
    // leave the host blocked until the next restart: a teardown is idempotent, so retry.
    // Forgetting the record would leave a VM or container running that nothing tracks: on
    // giving up it stays (marked deleting) for the next start-up or `recover`.
    let mut wait = Duration::from_secs(2);
    let mut attempt = 1;
    let machine = context.machine.clone();
    while let Err(e) = tear_down(context, &instance, machine.clone()).await {
        if attempt == DESTROY_ATTEMPTS || matches!(e, ManagerError::NoBackend { .. }) {
            tracing::error!(id = %instance.id, error = %e, attempt, "instance teardown failed; giving up until the next start-up or `recover`");
            return Done::of(Err::<bool, _>(e));
        }
        tracing::warn!(id = %instance.id, error = %e, attempt, retry_in_s = wait.as_secs(), "instance teardown failed; retrying");
        tokio::time::sleep(wait).await;
        wait *= 2;
        attempt += 1;
    }
    let forgotten = context.manager.forget(&instance.id).await;
    Done { machine: Some(None), ..Done::of(forgotten.map(|()| true)) }
}
