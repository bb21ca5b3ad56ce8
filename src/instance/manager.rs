//! The one command surface between the API and the backends (in the spirit of Firecracker's
//! `VmmAction`): admission of new instances, and a registry that routes every other command
//! to the instance's own task ([`task::InstanceTask`], its one owner).
//!
//! Reads (`status`, the stats loop) never wait for an operation: each task publishes its
//! record through a watch channel, and the registry's lock is held only to look a task up.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::model::{BackendKind, Instance, Status};
use super::spec::{self, HostLimits, SpecError};
use super::store::{Store, StoreError};
use super::transition::{self, Event};
use crate::backend::{self, BackendError, HostSweeper, Machine};
use crate::ports::{self, PortError};
use task::{Command, InstanceTask, TaskHandle};

mod events;
mod keys;
mod ops;
mod publish;
mod restore;
mod task;

pub use keys::KeyChange;
pub use publish::{PublishError, Publisher};
pub use restore::Restore;

/// How long a lifecycle command waits for the operation in progress on its instance.
const OP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a command was refused or failed. The API maps each variant to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The command does not fit the instance's state.
    #[error(transparent)]
    Conflict(#[from] transition::Conflict),
    #[error("{0}")]
    Invalid(#[from] SpecError),
    #[error("no instance can be created: {reason}")]
    NoBackend { reason: String },
    #[error("there is no instance")]
    NotFound,
    #[error("{0}")]
    Ports(#[from] PortError),
    /// Not enough free resources (GPUs).
    #[error("{0}")]
    Resources(String),
    #[error("the instance record could not be saved: {0}")]
    Store(#[from] StoreError),
}

/// A lifecycle command of `PUT /instances`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Start,
    Stop,
    Restart,
}

/// What `GET /instances` shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusView {
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// New, optional: guest port → why it is not public (e.g. the FRP server refused it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_errors: Option<BTreeMap<String, String>>,
    /// New, optional: the VM image the instance boots (VM hosts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_image: Option<String>,
    /// New, optional: the token of the JupyterLab the agent started (no `command`, guest port
    /// 8888 requested).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jupyter_token: Option<String>,
}

/// What `POST /instances` answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Created {
    pub id: String,
    pub status: Status,
    pub ports: BTreeMap<String, String>,
    /// New, optional: the VM image the instance boots (VM hosts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_image: Option<String>,
}

/// Why no backend can run instances here (the agent's choice of backend, sources kept).
pub type Unavailable = Arc<dyn std::error::Error + Send + Sync>;

/// Fixed facts the manager decides with.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    pub limits: HostLimits,
    /// PCI addresses of the GPUs this host offers.
    pub gpu_pool: Vec<String>,
    /// Which of them are quarantined or lost, and why (`None`: all are healthy, as in tests
    /// of the manager alone).
    pub gpu_health: Option<Arc<crate::gpu::health::HealthView>>,
    pub host_ports: RangeInclusive<u16>,
    /// Local mode: no tunnel publishes anything, so the ports a caller can reach are the
    /// 127.0.0.1 host ports, and those are what the answers show.
    pub local: bool,
}

struct Inner {
    backend: Result<Arc<dyn backend::Lifecycle>, Unavailable>,
    store: Store,
    settings: ManagerSettings,
    /// Each instance's task (std lock: held to look up, insert or remove, never across I/O).
    tasks: Mutex<BTreeMap<String, TaskHandle>>,
    /// Held by a create from its checks until its task is in `tasks`.
    admission: tokio::sync::Mutex<()>,
    publish: publish::PublishState,
    /// The host sweepers of every kind, for tearing down what a record's instance made when
    /// the running backend is of another kind (a record left by a boot that chose another).
    sweepers: std::sync::OnceLock<Vec<Arc<dyn HostSweeper>>>,
}

/// The instance manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl Manager {
    /// `backend` is `Err(reason)` when no backend can run on this host: creates answer 503.
    pub fn new(
        backend: Result<Arc<dyn backend::Lifecycle>, Unavailable>,
        store: Store,
        settings: ManagerSettings,
    ) -> Manager {
        let inner = Inner {
            backend,
            store,
            settings,
            tasks: Mutex::default(),
            admission: Default::default(),
            publish: Default::default(),
            sweepers: Default::default(),
        };
        Manager { inner: Arc::new(inner) }
    }

    /// A manager with no backend to run instances, for `recover` (the agent stopped): its
    /// tasks carry out recovery's decisions with the host sweepers of every kind.
    pub fn offline(store: Store, sweepers: Vec<Arc<dyn HostSweeper>>) -> Manager {
        let settings = ManagerSettings {
            limits: HostLimits {
                cpus: 0,
                memory_mib: 0,
                storage_gb: 0,
                default_cpus: 0,
                default_memory_mib: 0,
                default_storage_gb: 0,
            },
            gpu_pool: Vec::new(),
            gpu_health: None,
            host_ports: ports::HOST_PORTS,
            local: true,
        };
        let none =
            Arc::from(Box::<dyn std::error::Error + Send + Sync>::from("recover runs no instance"));
        let manager = Manager::new(Err(none), store, settings);
        manager.set_sweepers(sweepers);
        manager
    }

    fn backend(&self) -> Result<Arc<dyn backend::Lifecycle>, ManagerError> {
        let unavailable = |e: &Unavailable| ManagerError::NoBackend { reason: e.to_string() };
        self.inner.backend.clone().map_err(|e| unavailable(&e))
    }

    /// Gives the manager the host sweepers of every kind, for tearing down records the
    /// running backend did not make. Set once, at start-up.
    pub fn set_sweepers(&self, sweepers: Vec<Arc<dyn HostSweeper>>) {
        let _ = self.inner.sweepers.set(sweepers);
    }

    /// The running backend when `instance` is of its kind (it can adopt and run it).
    fn lifecycle_of(
        &self,
        instance: &Instance,
    ) -> Result<Arc<dyn backend::Lifecycle>, ManagerError> {
        match &self.inner.backend {
            Ok(backend) if backend.kind() == instance.backend => Ok(backend.clone()),
            _ => Err(ManagerError::NoBackend {
                reason: format!("no {} backend runs here now", instance.backend.as_str()),
            }),
        }
    }

    /// Stops what `instance` runs and removes what it made: by the running backend when of
    /// its kind (it holds the live VM or container), else by the sweeper of its kind. The
    /// wrong kind would find nothing and forget a VM or container that still runs.
    async fn tear_down_instance(
        &self,
        instance: &Instance,
        machine: Option<Arc<dyn Machine>>,
    ) -> Result<(), ManagerError> {
        if let Ok(backend) = self.lifecycle_of(instance) {
            return Ok(backend.destroy(instance, machine).await?);
        }
        let sweepers = self.inner.sweepers.get().map(Vec::as_slice).unwrap_or_default();
        match sweepers.iter().find(|s| s.kind() == instance.backend) {
            Some(sweeper) => Ok(sweeper.tear_down(instance).await?),
            None => Err(ManagerError::NoBackend {
                reason: format!("no {} backend can run here now", instance.backend.as_str()),
            }),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TaskHandle>> {
        self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn task(&self, id: &str) -> Option<TaskHandle> {
        self.tasks().get(id).cloned()
    }

    /// The instance the single-instance API talks about: the oldest one not being deleted.
    fn current(&self) -> Option<TaskHandle> {
        let tasks = self.tasks();
        let mut live: Vec<_> = tasks.values().filter(|t| !t.snapshot().deleting).collect();
        live.sort_by_key(|t| t.snapshot().created_at);
        live.first().map(|t| (*t).clone())
    }

    /// Starts the task of `instance` and registers it.
    fn spawn_task(&self, instance: Instance) -> TaskHandle {
        let id = instance.id.clone();
        let handle = InstanceTask::spawn(self.clone(), instance);
        self.tasks().insert(id, handle.clone());
        handle
    }

    /// The status reported to the control plane.
    pub fn current_status(&self) -> Status {
        self.current().map(|t| t.snapshot().status).unwrap_or(Status::Destroyed)
    }

    /// Every record, deleted-in-progress ones included (recovery and tests).
    pub fn instances(&self) -> Vec<Instance> {
        self.tasks().values().map(|t| t.snapshot()).collect()
    }

    pub fn status(&self) -> StatusView {
        match self.current() {
            None => StatusView {
                status: Status::Destroyed,
                id: None,
                ports: None,
                gpus: None,
                error: None,
                created_at: None,
                port_errors: None,
                vm_image: None,
                jupyter_token: None,
            },
            Some(task) => {
                let i = task.snapshot();
                StatusView {
                    status: i.status,
                    ports: Some(self.port_map(&i)),
                    gpus: Some(i.gpus.len()),
                    error: i.error,
                    created_at: Some(i.created_at),
                    port_errors: self.port_errors(&i.id),
                    vm_image: i.vm_image,
                    jupyter_token: i.jupyter_token.map(|t| t.expose().to_owned()),
                    id: Some(i.id),
                }
            }
        }
    }

    /// The limits a create request is validated against (`spec::parse_create`, by the API).
    pub fn limits(&self) -> &HostLimits {
        &self.inner.settings.limits
    }

    /// Admits a parsed create request (`spec::parse_create`); the build continues in the
    /// background.
    ///
    /// Creates are admitted one at a time (an async lock), so the checks can do their I/O
    /// (sysfs, `/proc`, test binds of ports, the record's fsync) off the runtime's workers
    /// without a std lock held: status reads and the stats loop never wait for a create.
    pub async fn create(&self, spec: spec::Spec) -> Result<Created, ManagerError> {
        let backend = self.backend()?;
        backend.validate(&spec).map_err(|e| match e {
            BackendError::Unsupported { field, reason } => {
                ManagerError::Invalid(SpecError { field: field.to_owned(), reason })
            }
            other => ManagerError::Backend(other),
        })?;
        let _admission = self.inner.admission.lock().await;
        let held = self.instances();
        if let Some(existing) = held.first() {
            let reason = if existing.deleting {
                "the previous instance is still being deleted; try again shortly"
            } else {
                "an instance already exists on this host; delete it first"
            };
            let status = if existing.deleting { Status::Destroyed } else { existing.status };
            let conflict = transition::Conflict { status, reason: reason.into() };
            return Err(ManagerError::Conflict(conflict));
        }
        let instance = self
            .blocking(move |manager| {
                let gpus = manager.pick_gpus(spec.gpus, &held)?;
                let instance = manager.admit(spec, gpus, &held, backend.as_ref())?;
                manager.inner.store.save(&instance)?;
                Ok(instance)
            })
            .await?;
        let created = Created {
            id: instance.id.clone(),
            status: instance.status,
            ports: self.port_map(&instance),
            vm_image: instance.vm_image.clone(),
        };
        tracing::info!(id = %instance.id, gpus = instance.gpus.len(), "instance accepted");
        let task = self.spawn_task(instance);
        // A fresh channel has room: this never waits.
        let _ = task.commands.send(Command::Create).await;
        Ok(created)
    }

    /// The new record: GPUs the backend can take now (sysfs, holders in `/proc`), host ports
    /// (test-bound), tunnels the publisher accepts. Blocking: run it off the runtime.
    fn admit(
        &self,
        spec: spec::Spec,
        gpus: Vec<String>,
        held: &[Instance],
        backend: &dyn backend::Lifecycle,
    ) -> Result<Instance, ManagerError> {
        let refused = |e| match e {
            BackendError::Refused { reason } => ManagerError::Resources(reason),
            other => ManagerError::Backend(other),
        };
        backend.check_gpus(&gpus).map_err(refused)?;
        backend.check_memory(&spec, &gpus).map_err(refused)?;
        // Measured now, not at start-up: the disk fills while the agent runs.
        backend.check_disk(&spec, held).map_err(refused)?;
        let taken = ports::Taken::from_instances(held);
        let host_range = self.inner.settings.host_ports.clone();
        let ports = ports::allocate(&spec.ports, &taken, host_range)?;
        let network = backend.guest_network(held).map_err(refused)?;
        let vm_image = backend.vm_image(&spec);
        let jupyter_token = jupyter_token(&spec, backend.kind());
        let instance = Instance {
            id: uuid::Uuid::new_v4().to_string(),
            backend: backend.kind(),
            spec,
            status: Status::Pending,
            error: None,
            created_at: Utc::now(),
            ports,
            gpus,
            ssh_keys: Vec::new(),
            management_port: None,
            network,
            deleting: false,
            vm_image,
            jupyter_token,
        };
        self.validate_tunnels(&instance)?;
        Ok(instance)
    }

    /// Runs blocking work (file system, sysfs) on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Manager) -> Result<T, ManagerError> + Send + 'static,
    ) -> Result<T, ManagerError> {
        let manager = self.clone();
        tokio::task::spawn_blocking(move || work(&manager))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// The first `wanted` GPUs (all by default) that no instance holds and that are neither
    /// quarantined nor lost. Blocking (reads the GPUs' health).
    fn pick_gpus(
        &self,
        wanted: Option<u32>,
        held: &[Instance],
    ) -> Result<Vec<String>, ManagerError> {
        let settings = &self.inner.settings;
        let unavailable = settings.gpu_health.as_ref().map(|h| h.unavailable()).unwrap_or_default();
        let free: Vec<String> = settings
            .gpu_pool
            .iter()
            .filter(|addr| !held.iter().any(|i| i.gpus.contains(addr)))
            .filter(|addr| !unavailable.iter().any(|(gpu, _)| gpu == *addr))
            .cloned()
            .collect();
        let wanted = wanted.map(|n| n as usize).unwrap_or(free.len());
        if wanted > free.len() {
            let mut reason =
                format!("{wanted} GPU(s) requested but {} free on this host", free.len());
            for (_, why) in &unavailable {
                reason.push_str(&format!("; {why}"));
            }
            return Err(ManagerError::Resources(reason));
        }
        Ok(free.into_iter().take(wanted).collect())
    }

    /// `PUT /instances`: answered once applied (`stop` and a `start` that resumes: once
    /// done). A command that does not fit the state is refused at once; one that fits waits
    /// up to [`OP_WAIT`] for an operation in progress.
    pub async fn lifecycle(&self, command: Lifecycle) -> Result<(), ManagerError> {
        let task = self.current().ok_or(ManagerError::NotFound)?;
        let event = match command {
            Lifecycle::Start => Event::Start,
            Lifecycle::Stop => Event::Stop,
            Lifecycle::Restart => Event::Restart,
        };
        task.ask(|reply| Command::Lifecycle { event, reply }).await
    }

    /// `DELETE /instances`: answered at once; teardown continues in the background.
    pub async fn delete(&self) -> Result<(), ManagerError> {
        let task = self.current().ok_or(ManagerError::NotFound)?;
        task.ask(|reply| Command::Delete { reply }).await
    }

    /// At exit: finishes every deletion already accepted, the VMs and containers stopped at
    /// once (QMP `quit`, then signals), within `within`. A deletion still unfinished then
    /// keeps its record (marked deleting) for the next start-up or `recover`.
    pub async fn finish_deletions(&self, within: std::time::Duration) {
        let deleting: Vec<(String, TaskHandle)> = self
            .tasks()
            .iter()
            .filter(|(_, task)| task.snapshot().deleting)
            .map(|(id, task)| (id.clone(), task.clone()))
            .collect();
        if deleting.is_empty() {
            return;
        }
        tracing::info!(count = deleting.len(), "finishing the deletions in progress before exit");
        let finished = deleting.into_iter().map(|(id, mut task)| async move {
            let _ = task.commands.send(Command::Hurry).await;
            // The task drops its record's sender when it ends, after forgetting the instance.
            while task.record.changed().await.is_ok() {}
            id
        });
        let all = futures_util::future::join_all(finished);
        if tokio::time::timeout(within, all).await.is_err() {
            let left: Vec<String> =
                self.instances().into_iter().filter(|i| i.deleting).map(|i| i.id).collect();
            tracing::error!(
                ?left,
                "deletions unfinished at exit; the next start-up or `recover` finishes them"
            );
        }
    }

    /// Drops the instance's task from the registry, then its record. In this order a create
    /// that follows the record's removal is never refused as "still being deleted"; a record
    /// that cannot be removed (marked deleting) is torn down again, idempotently, at the next
    /// start-up.
    async fn forget(&self, id: &str) -> Result<(), ManagerError> {
        self.tasks().remove(id);
        let (store, id) = (self.inner.store.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || store.remove(&id))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        Ok(())
    }

    /// Guest port → the port a caller reaches it on (see [`ManagerSettings::local`]).
    fn port_map(&self, instance: &Instance) -> BTreeMap<String, String> {
        if !self.inner.settings.local {
            return instance.port_map();
        }
        let ports = instance.ports.iter();
        ports.map(|p| (p.guest_port.to_string(), p.host_port.to_string())).collect()
    }

    /// The PCI addresses of the GPUs this host offers.
    /// Each offered GPU's health as last seen (the health watch refreshes it every few
    /// seconds; no I/O once it has run).
    pub fn gpu_health_report(&self) -> Vec<crate::gpu::health::GpuHealth> {
        self.inner.settings.gpu_health.as_ref().map(|h| h.latest()).unwrap_or_default()
    }

    pub fn gpu_pool(&self) -> &[String] {
        &self.inner.settings.gpu_pool
    }

    /// Which backend kind builds instances here, if any.
    pub fn backend_kind(&self) -> Option<BackendKind> {
        self.inner.backend.as_ref().ok().map(|b| b.kind())
    }
}

#[cfg(test)]
mod tests;

/// The token for the JupyterLab the agent starts itself: on a VM asked for guest port 8888
/// with no `command`. The renter's own `JUPYTER_TOKEN` wins; otherwise a fresh random one.
fn jupyter_token(spec: &spec::Spec, backend: BackendKind) -> Option<crate::secret::Secret> {
    let wanted = backend == BackendKind::Qemu
        && spec.command.is_none()
        && spec.ports.iter().any(|p| p.guest_port == crate::instance::model::JUPYTER_PORT);
    if !wanted {
        return None;
    }
    if let Some(token) = spec.env.get("JUPYTER_TOKEN").filter(|t| !t.is_empty()) {
        return Some(crate::secret::Secret::new(token.clone()));
    }
    use rand::Rng;
    let token: String =
        rand::rng().sample_iter(rand::distr::Alphanumeric).take(40).map(char::from).collect();
    Some(crate::secret::Secret::new(token))
}
