//! What builds and runs an instance: a QEMU VM (first choice) or a Docker container.
//!
//! The instance manager is the only caller. A backend derives every name and path it uses from
//! the instance id, so the record alone is enough to find, adopt or clean up what it made.

pub mod choice;
pub mod docker;
pub mod qemu;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::instance::model::{BackendKind, Instance};
use crate::instance::spec::Spec;

/// A backend operation failed. `Display` is one sentence a user can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The guest did not become reachable in time.
    #[error("the guest did not become reachable within {seconds} s: {detail}")]
    NotReachable { seconds: u64, detail: String },
    /// The VM cannot boot: QEMU stopped it or exited, or its console shows a failure.
    #[error("the VM did not boot: {detail}")]
    BootFailed { detail: String },
    /// An operation on the instance failed; `source` is the failure itself (a QMP, SSH,
    /// disk or engine error), kept for whoever walks the chain.
    #[error("{operation} failed: {source}")]
    Operation {
        operation: &'static str,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The host cannot give what the request needs now (a GPU in use, on nouveau, …):
    /// answered with 409.
    #[error("{reason}")]
    Refused { reason: String },
    /// The request asks for something this backend cannot give (answered with 400).
    #[error("{field}: {reason}")]
    Unsupported { field: &'static str, reason: String },
    /// The instance's process or container no longer exists.
    #[error("the instance is gone: {detail}")]
    Gone { detail: String },
}

impl BackendError {
    /// `operation` failed with `source` (an error, or a sentence when there is none).
    pub fn op(
        operation: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError::Operation { operation, source: Arc::from(source.into()) }
    }
}

/// Equal when they say the same (a source is compared by its message): for tests and for
/// telling a repeated failure from a new one.
impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                BackendError::Operation { operation: a, source: x },
                BackendError::Operation { operation: b, source: y },
            ) => a == b && x.to_string() == y.to_string(),
            (BackendError::Operation { .. }, _) | (_, BackendError::Operation { .. }) => false,
            _ => {
                self.to_string() == other.to_string()
                    && std::mem::discriminant(self) == std::mem::discriminant(other)
            }
        }
    }
}

impl Eq for BackendError {}

/// What a backend learns on its own, outside a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// The instance's VM or container stopped without being asked to (crash, guest poweroff).
    Exited { id: String, reason: String },
    /// The instance runs again without the agent having asked (a container restarted by its
    /// restart policy, or by an engine that came back): it needs configuring again.
    Started { id: String },
}

/// Where a backend reports [`BackendEvent`]s.
pub type EventSink = mpsc::UnboundedSender<BackendEvent>;

/// What [`Lifecycle::adopt`] found for a recorded instance after an agent restart.
pub enum Adoption {
    /// Alive and reattached (monitoring resumed): its machine, for the instance's task.
    Adopted(Arc<dyn Machine>),
    /// Its process or container is gone.
    Gone { detail: String },
    /// It could not be checked now (an engine that does not answer). It is watched all the
    /// same: when it answers again and the instance runs, a [`BackendEvent::Started`] follows.
    Unsure { machine: Arc<dyn Machine>, error: BackendError },
}

impl std::fmt::Debug for Adoption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Adoption::Adopted(_) => f.write_str("Adopted"),
            Adoption::Gone { detail } => f.debug_struct("Gone").field("detail", detail).finish(),
            Adoption::Unsure { error, .. } => {
                f.debug_struct("Unsure").field("error", error).finish()
            }
        }
    }
}

/// A VM or container on the host that carries this agent's marker, found without the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The instance id in the marker.
    pub instance_id: String,
    /// What it is, for logs and `recover`'s table ("QEMU pid 1234", "container 3f2a…").
    pub what: String,
}

/// One implementation per way of running an instance: what makes, starts again, adopts and
/// removes an instance's [`Machine`], from its record. (What belongs to the agent on the
/// host, with or without a record, is a [`HostSweeper`]'s.)
#[async_trait]
pub trait Lifecycle: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// A place on the agent's bridge for a new instance, besides those `held` (a VM's; a
    /// container gets its address from Docker). Refused when the subnet is full.
    fn guest_network(
        &self,
        held: &[Instance],
    ) -> Result<Option<crate::network::GuestNet>, BackendError> {
        let _ = held;
        Ok(None)
    }

    /// Checks what only the backend knows (known image names, …), before anything starts.
    fn validate(&self, spec: &Spec) -> Result<(), BackendError>;

    /// The name of the VM image a valid `spec` boots (`None`: this backend runs no VMs).
    fn vm_image(&self, spec: &Spec) -> Option<String> {
        let _ = spec;
        None
    }

    /// Checks, reading only, that these GPUs (PCI addresses) can be given to a new instance
    /// now; a refusal is [`BackendError::Refused`].
    fn check_gpus(&self, gpus: &[String]) -> Result<(), BackendError> {
        let _ = gpus;
        Ok(())
    }

    /// Checks, reading only, that `spec`'s memory fits where the instance would run with
    /// these GPUs (the huge page pools of their NUMA nodes); a refusal is
    /// [`BackendError::Refused`].
    fn check_memory(&self, spec: &Spec, gpus: &[String]) -> Result<(), BackendError> {
        let _ = (spec, gpus);
        Ok(())
    }

    /// Checks, reading only, that the host's disk can hold `spec`'s `storage_gb` besides what
    /// the `held` instances may still grow to; a refusal is [`BackendError::Refused`].
    fn check_disk(&self, spec: &Spec, held: &[Instance]) -> Result<(), BackendError> {
        let _ = (spec, held);
        Ok(())
    }

    /// Builds and starts the instance. On failure everything it made is already removed.
    async fn launch(&self, instance: &Instance) -> Result<Arc<dyn Machine>, BackendError>;

    /// Starts the instance again from its disk after its process is gone.
    async fn boot(&self, instance: &Instance) -> Result<Arc<dyn Machine>, BackendError>;

    /// Reattaches to the instance after an agent restart, without touching the guest.
    async fn adopt(&self, instance: &Instance) -> Result<Adoption, BackendError>;

    /// Stops the instance (through `machine` when its task holds one, else whatever carries
    /// its marker) and removes everything it made. Idempotent: what is already gone is not an
    /// error.
    async fn destroy(
        &self,
        instance: &Instance,
        machine: Option<Arc<dyn Machine>>,
    ) -> Result<(), BackendError>;
}

/// One instance's live VM or container, held by the instance's task only: its process (or
/// container) handle and its one guest connection. Dropped when the instance stops for good.
#[async_trait]
pub trait Machine: Send + Sync + 'static {
    /// Waits, with the backend's own deadline, until the guest answers. A boot that fails
    /// leaves nothing running.
    async fn wait_ready(&self, instance: &Instance) -> Result<(), BackendError>;

    /// Applies renter keys and starts the renter's command. Idempotent: called after every
    /// boot, reset and adoption.
    async fn configure(&self, instance: &Instance) -> Result<(), BackendError>;

    /// Makes the guest's renter keys exactly `instance.ssh_keys`.
    async fn apply_ssh_keys(&self, instance: &Instance) -> Result<(), BackendError>;

    /// Stops the vCPUs (container: pause); everything else is kept.
    async fn pause(&self) -> Result<(), BackendError>;

    async fn resume(&self) -> Result<(), BackendError>;

    /// Resets the guest (container: restart); [`Machine::wait_ready`] follows.
    async fn reset(&self) -> Result<(), BackendError>;

    /// Stops the VM or container for good along the backend's graceful ladder; what it made
    /// stays (that is [`Lifecycle::destroy`]'s). Idempotent.
    async fn stop(&self) -> Result<(), BackendError>;

    /// Stops it at once (QEMU: `quit`, then signals; a container: killed), for a deletion
    /// that must finish before the agent exits. A [`Machine::stop`] under way then returns.
    async fn stop_now(&self) -> Result<(), BackendError>;
}

/// What belongs to this agent on the host, found without a record: a backend kind's side of
/// recovery, `recover` and host maintenance. Built from where things live only, so it never
/// needs what running an instance needs (keys, firmware, an accelerator decision).
#[async_trait]
pub trait HostSweeper: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// Everything on the host carrying this agent's marker (QEMU: `-name qudata-<id>` in
    /// `/proc/<pid>/cmdline`; Docker: the agent's label), with or without a record.
    async fn find_owned(&self) -> Result<Vec<Owned>, BackendError>;

    /// Stops and removes an orphan that [`HostSweeper::find_owned`] returned and no record claims:
    /// graceful stop with a deadline, then kill; everything it made removed. Idempotent.
    async fn reap(&self, owned: &Owned) -> Result<(), BackendError>;

    /// Stops the process of an instance whose record is kept (host maintenance, `recover
    /// --stop-all`): graceful stop with a deadline, then kill, its GPUs returned; its disk and
    /// files stay, so `start` boots it again. Idempotent; touches only its own kind.
    async fn halt(&self, owned: &Owned) -> Result<(), BackendError>;

    /// Stops whatever a record's instance still runs and removes everything it made (a
    /// record of a kind the agent does not run now, an interrupted create). Idempotent.
    async fn tear_down(&self, instance: &Instance) -> Result<(), BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_keeps_its_source_and_says_it_in_one_sentence() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "monitor hung");
        let err = BackendError::op("stop QEMU", io);
        assert_eq!(err.to_string(), "stop QEMU failed: monitor hung");
        // The source is the error itself, shared (an `Arc`, so the error stays `Clone`).
        let source = std::error::Error::source(&err).expect("a source");
        assert_eq!(source.to_string(), "monitor hung");
        let shared = source.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>().unwrap();
        let io = shared.downcast_ref::<std::io::Error>().expect("the io::Error itself");
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(err.clone(), BackendError::op("stop QEMU", "monitor hung"));
        assert_ne!(err, BackendError::op("start QEMU", "monitor hung"));
        assert_ne!(err, BackendError::Gone { detail: "stop QEMU failed: monitor hung".into() });
    }
}
