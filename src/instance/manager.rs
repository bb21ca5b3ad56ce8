//! The one command surface between the API and the backends (in the spirit of Firecracker's
//! `VmmAction`): admission, the state machine and the per-instance lock.
//!
//! Reads (`status`, the stats loop) never wait for an operation: the record sits behind a
//! short-held mutex, while a slow operation holds the instance's async `op` lock.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use super::model::{BackendKind, Instance, Status};
use super::spec::{self, HostLimits, SpecError};
use super::store::{Store, StoreError};
use super::transition::{self, Event, Flow};
use crate::backend::{self, BackendError, HostSweeper};
use crate::ports::{self, PortError};

mod events;
mod flows;
mod keys;
mod publish;
mod restore;

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
}

/// What `POST /instances` answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Created {
    pub id: String,
    pub status: Status,
    pub ports: BTreeMap<String, String>,
}

/// Fixed facts the manager decides with.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    pub limits: HostLimits,
    /// PCI addresses of the GPUs this host offers.
    pub gpu_pool: Vec<String>,
    pub host_ports: RangeInclusive<u16>,
    /// Local mode: no tunnel publishes anything, so the ports a caller can reach are the
    /// 127.0.0.1 host ports, and those are what the answers show.
    pub local: bool,
}

/// One instance: its record and the lock held by whatever operation changes it.
struct Slot {
    /// The record as last saved: a read takes a copy and never waits for a write.
    record: watch::Sender<Instance>,
    /// Held while a change is decided, saved (off the runtime) and published.
    write: tokio::sync::Mutex<()>,
    op: Arc<tokio::sync::Mutex<()>>,
    /// Set by `DELETE` so that a boot in progress stops waiting.
    cancel: watch::Sender<bool>,
}

impl Slot {
    fn new(record: Instance) -> Slot {
        Slot {
            record: watch::Sender::new(record),
            write: Default::default(),
            op: Arc::default(),
            cancel: watch::Sender::new(false),
        }
    }

    fn snapshot(&self) -> Instance {
        self.record.borrow().clone()
    }
}

struct Inner {
    backend: Result<Arc<dyn backend::Lifecycle>, String>,
    store: Store,
    settings: ManagerSettings,
    slots: Mutex<BTreeMap<String, Arc<Slot>>>,
    /// Held by a create from its checks until its record is in `slots`.
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
        backend: Result<Arc<dyn backend::Lifecycle>, String>,
        store: Store,
        settings: ManagerSettings,
    ) -> Manager {
        let slots = Mutex::new(BTreeMap::new());
        let inner = Inner {
            backend,
            store,
            settings,
            slots,
            admission: Default::default(),
            publish: Default::default(),
            sweepers: Default::default(),
        };
        Manager { inner: Arc::new(inner) }
    }

    fn backend(&self) -> Result<Arc<dyn backend::Lifecycle>, ManagerError> {
        self.inner.backend.clone().map_err(|reason| ManagerError::NoBackend { reason })
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
    async fn tear_down_instance(&self, instance: &Instance) -> Result<(), ManagerError> {
        if let Ok(backend) = self.lifecycle_of(instance) {
            return Ok(backend.destroy(instance).await?);
        }
        let sweepers = self.inner.sweepers.get().map(Vec::as_slice).unwrap_or_default();
        match sweepers.iter().find(|s| s.kind() == instance.backend) {
            Some(sweeper) => Ok(sweeper.tear_down(instance).await?),
            None => Err(ManagerError::NoBackend {
                reason: format!("no {} backend can run here now", instance.backend.as_str()),
            }),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.inner.slots.lock().expect("slots lock")
    }

    /// The instance the single-instance API talks about: the oldest one not being deleted.
    fn current(&self) -> Option<Arc<Slot>> {
        let slots = self.slots();
        let mut live: Vec<_> = slots.values().filter(|s| !s.snapshot().deleting).collect();
        live.sort_by_key(|s| s.snapshot().created_at);
        live.first().map(|s| Arc::clone(s))
    }

    /// The status reported to the control plane.
    pub fn current_status(&self) -> Status {
        self.current().map(|s| s.snapshot().status).unwrap_or(Status::Destroyed)
    }

    /// Every record, deleted-in-progress ones included (recovery and tests).
    pub fn instances(&self) -> Vec<Instance> {
        self.slots().values().map(|s| s.snapshot()).collect()
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
            },
            Some(slot) => {
                let i = slot.snapshot();
                StatusView {
                    status: i.status,
                    ports: Some(self.port_map(&i)),
                    gpus: Some(i.gpus.len()),
                    error: i.error,
                    created_at: Some(i.created_at),
                    port_errors: self.port_errors(&i.id),
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
        let held: Vec<Instance> = self.slots().values().map(|s| s.snapshot()).collect();
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
        let gpus = self.pick_gpus(spec.gpus, &held)?;
        let instance = self
            .blocking(move |manager| {
                let instance = manager.admit(spec, gpus, &held, backend.as_ref())?;
                manager.inner.store.save(&instance)?;
                Ok(instance)
            })
            .await?;
        let created = Created {
            id: instance.id.clone(),
            status: instance.status,
            ports: self.port_map(&instance),
        };
        let slot = Arc::new(Slot::new(instance.clone()));
        self.slots().insert(instance.id.clone(), Arc::clone(&slot));
        tracing::info!(id = %instance.id, gpus = instance.gpus.len(), "instance accepted");
        self.spawn_flow(slot, Flow::Create);
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
        backend.check_gpus(&gpus).map_err(|e| match e {
            BackendError::Refused { reason } => ManagerError::Resources(reason),
            other => ManagerError::Backend(other),
        })?;
        let taken = ports::Taken::from_instances(held);
        let host_range = self.inner.settings.host_ports.clone();
        let ports = ports::allocate(&spec.ports, &taken, host_range.clone())?;
        let management_port = match backend.management_guest_port() {
            Some(_) => Some(ports::allocate_host(&taken, &ports, host_range)?),
            None => None,
        };
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
            management_port,
            deleting: false,
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

    fn pick_gpus(
        &self,
        wanted: Option<u32>,
        held: &[Instance],
    ) -> Result<Vec<String>, ManagerError> {
        let free: Vec<String> = self
            .inner
            .settings
            .gpu_pool
            .iter()
            .filter(|addr| !held.iter().any(|i| i.gpus.contains(addr)))
            .cloned()
            .collect();
        let wanted = wanted.map(|n| n as usize).unwrap_or(free.len());
        if wanted > free.len() {
            return Err(ManagerError::Resources(format!(
                "{wanted} GPU(s) requested but {} free on this host",
                free.len()
            )));
        }
        Ok(free.into_iter().take(wanted).collect())
    }

    /// `PUT /instances`.
    pub async fn lifecycle(&self, command: Lifecycle) -> Result<(), ManagerError> {
        let slot = self.current().ok_or(ManagerError::NotFound)?;
        let event = match command {
            Lifecycle::Start => Event::Start,
            Lifecycle::Stop => Event::Stop,
            Lifecycle::Restart => Event::Restart,
        };
        // A state mismatch is answered at once; only a fitting command waits its turn.
        transition::apply(&mut slot.snapshot(), &event)?; // a dry run on a copy
        // Short operations (re-applying keys after adoption, a pause) finish soon: wait for
        // them rather than refuse. A boot holds the lock for long, but its state is refused
        // above.
        let guard = tokio::time::timeout(OP_WAIT, Arc::clone(&slot.op).lock_owned())
            .await
            .map_err(|_| transition::Conflict {
                status: slot.snapshot().status,
                reason: "another operation on the instance is in progress".to_owned(),
            })?;
        // The state may have moved while waiting: decided again, and applied.
        match self.apply(&slot, &event).await? {
            None => Ok(()),
            // Pause and resume are quick QMP calls: answer with their result.
            Some(flow @ (Flow::Pause | Flow::Resume)) => {
                flows::run_quick(self, &slot, flow, guard).await
            }
            Some(flow) => {
                self.spawn_locked_flow(slot, flow, guard);
                Ok(())
            }
        }
    }

    /// `DELETE /instances`: answered at once; teardown continues in the background.
    pub async fn delete(&self) -> Result<(), ManagerError> {
        let slot = self.current().ok_or(ManagerError::NotFound)?;
        self.begin_delete(slot).await
    }

    /// Marks the instance deleted and starts its teardown; a boot in progress stops waiting.
    async fn begin_delete(&self, slot: Arc<Slot>) -> Result<(), ManagerError> {
        if let Some(flow) = self.apply(&slot, &Event::Delete).await? {
            slot.cancel.send_replace(true);
            tracing::info!(id = %slot.snapshot().id, "instance deletion accepted");
            self.spawn_flow(slot, flow);
        }
        Ok(())
    }

    fn spawn_flow(&self, slot: Arc<Slot>, flow: Flow) {
        let manager = self.clone();
        tokio::spawn(async move {
            let guard = Arc::clone(&slot.op).lock_owned().await;
            flows::run(&manager, &slot, flow, guard).await;
        });
    }

    fn spawn_locked_flow(&self, slot: Arc<Slot>, flow: Flow, guard: flows::OpGuard) {
        let manager = self.clone();
        tokio::spawn(async move { flows::run(&manager, &slot, flow, guard).await });
    }

    /// Changes the record and saves it (fsync, on the blocking pool); on a failed save the
    /// record is unchanged. Changes of one instance happen one at a time.
    async fn change<T: Send + 'static>(
        &self,
        slot: &Slot,
        change: impl FnOnce(&mut Instance) -> Result<T, ManagerError> + Send + 'static,
    ) -> Result<T, ManagerError> {
        let _writing = slot.write.lock().await;
        let before = slot.snapshot();
        let (out, after) = self
            .blocking(move |manager| {
                let mut after = before.clone();
                let out = change(&mut after)?;
                if after != before {
                    manager.inner.store.save(&after)?;
                }
                Ok((out, after))
            })
            .await?;
        slot.record.send_if_modified(|record| {
            let modified = *record != after;
            *record = after;
            modified
        });
        Ok(out)
    }

    async fn update(
        &self,
        slot: &Slot,
        change: impl FnOnce(&mut Instance) + Send + 'static,
    ) -> Result<(), ManagerError> {
        self.change(slot, |record| {
            change(record);
            Ok(())
        })
        .await
    }

    /// The one place an instance's status changes: `event` decided by
    /// [`transition::transition`], the record saved when it changed. Returns the flow the
    /// transition starts; on a refusal or a failed save the record is unchanged.
    async fn apply(&self, slot: &Slot, event: &Event) -> Result<Option<Flow>, ManagerError> {
        let event = event.clone();
        self.change(slot, move |record| Ok(transition::apply(record, &event)?)).await
    }

    /// Drops the instance, then its record. In this order a create that follows the record's
    /// removal is never refused as "still being deleted"; a record that cannot be removed
    /// (marked deleting) is torn down again, idempotently, at the next start-up.
    fn forget(&self, id: &str) -> Result<(), ManagerError> {
        self.slots().remove(id);
        self.inner.store.remove(id)?;
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
