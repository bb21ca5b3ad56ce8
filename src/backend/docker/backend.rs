//! `DockerBackend`: the [`Lifecycle`] that runs each instance as a container (a
//! [`DockerMachine`] held by the instance's task), and the [`HostSweeper`] of containers.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::query_parameters::CreateContainerOptionsBuilder;

use super::engine::{CALL, Engine};
use super::error::DockerError;
use super::machine::DockerMachine;
use super::network;
use super::owned::{self, Fate};
use super::plan::{self, container_name};
use super::pull;
use super::watch::{self, Watch};
use crate::backend::{Adoption, BackendError, EventSink, HostSweeper, Lifecycle, Machine, Owned};
use crate::instance::model::{BackendKind, Instance};
use crate::instance::spec::Spec;
use crate::network::HostNetwork;

/// What the Docker backend needs to know.
#[derive(Clone, Debug)]
pub struct DockerSettings {
    /// The engine's socket (`QUDATA_DOCKER_HOST`).
    pub socket: PathBuf,
    /// This agent's name on its containers ([`plan::LABEL_OWNER`]): its data dir.
    pub owner: String,
    /// From start to running.
    pub start_deadline: Duration,
    /// SIGTERM to SIGKILL on delete and restart.
    pub stop_grace: Duration,
    pub pull_deadline: Duration,
    /// When a create pulls its image (`QUDATA_DOCKER_PULL`).
    pub pull: pull::PullPolicy,
    /// Every NVIDIA GPU of the host (PCI addresses). The device request gives a container all
    /// of them, so a container may only be given all of them or none.
    pub host_gpus: Vec<String>,
    /// Registries on private addresses the operator allows (`QUDATA_DOCKER_PRIVATE_REGISTRIES`:
    /// a mirror on the LAN); every other one on the host or a private network is refused.
    pub private_registries: Vec<String>,
    /// Containers may run without a disk limit where the engine cannot enforce `storage_gb`
    /// (`QUDATA_DOCKER_UNLIMITED_DISK`); else such creates are refused.
    pub unlimited_disk: bool,
    /// The agent's network and rules containers run on; `None`: Docker's default bridge
    /// (tests of the engine alone).
    pub network: Option<Arc<HostNetwork>>,
}

impl DockerSettings {
    pub fn new(socket: PathBuf, owner: String) -> DockerSettings {
        DockerSettings {
            socket,
            owner,
            start_deadline: Duration::from_secs(120),
            stop_grace: Duration::from_secs(10),
            pull_deadline: Duration::from_secs(30 * 60),
            pull: pull::PullPolicy::default(),
            host_gpus: Vec::new(),
            unlimited_disk: false,
            network: None,
            private_registries: Vec::new(),
        }
    }
}

/// Holds no container: each is a [`DockerMachine`] held by its instance's task. Cheap to
/// clone.
#[derive(Clone)]
pub struct DockerBackend {
    pub(super) settings: DockerSettings,
    pub(super) engine: Engine,
    events: EventSink,
    /// Until the engine refuses one, containers get `storage_gb` as a disk limit.
    disk_quota: Arc<AtomicBool>,
    /// Images pulled with a login that the engine may still hold.
    logins: pull::LoginImages,
}

impl DockerBackend {
    /// Connects to the engine; fails when it does not answer within a few seconds.
    pub async fn connect(settings: DockerSettings, events: EventSink) -> Result<Self, DockerError> {
        let engine = Engine::connect(&settings.socket).await?;
        // What the engine says of its storage: a driver known not to limit a container's disk
        // is known from the start; one that may (overlay2 on xfs needs `pquota`) is tried.
        let limits = match engine.docker.info().await {
            Ok(info) => plan::disk_quota_possible(&info),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the engine's storage driver");
                true
            }
        };
        let disk_quota = Arc::new(AtomicBool::new(limits));
        let logins = pull::LoginImages::default();
        Ok(DockerBackend { settings, engine, events, disk_quota, logins })
    }

    /// Says once, for the backend that runs instances, when the engine is known not to limit
    /// a container's disk.
    pub fn log_disk_limits(&self) {
        if !self.disk_quota.load(Ordering::Relaxed) {
            self.warn_no_disk_limit("the engine's storage driver");
        }
    }

    /// Why `storage_gb` cannot be honoured here, for a refused create.
    fn no_disk_limit() -> String {
        "this host's Docker engine cannot limit a container's disk (its storage driver needs \
         overlay2 on xfs mounted with pquota, btrfs or zfs); the operator may allow containers \
         without a disk limit (QUDATA_DOCKER_UNLIMITED_DISK=true)"
            .to_owned()
    }

    fn warn_no_disk_limit(&self, seen: &str) {
        if self.settings.unlimited_disk {
            tracing::warn!(%seen, "storage_gb is not enforced for containers (QUDATA_DOCKER_UNLIMITED_DISK=true)");
        } else {
            tracing::warn!(%seen, "the Docker engine cannot limit a container's disk: creates are refused until it can (or QUDATA_DOCKER_UNLIMITED_DISK=true)");
        }
    }

    /// The instance's machine: its container, watched from the run `started_at` on.
    fn machine(
        &self,
        instance: &Instance,
        started_at: Option<String>,
        known_down: bool,
    ) -> Arc<DockerMachine> {
        let name = container_name(&instance.id);
        let watch = Watch::spawn(
            self.engine.clone(),
            instance.id.clone(),
            name.clone(),
            self.events.clone(),
            started_at,
            known_down,
        );
        Arc::new(DockerMachine { backend: self.clone(), id: instance.id.clone(), name, watch })
    }

    /// Stops and removes `name` if, and only if, it is this agent's container for `id`.
    pub(super) async fn remove_owned(&self, name: &str, id: &str) -> Result<(), DockerError> {
        let (owner, grace) = (&self.settings.owner, self.settings.stop_grace);
        owned::remove(&self.engine, name, id, owner, grace).await
    }

    async fn create_and_start(&self, instance: &Instance) -> Result<Option<String>, DockerError> {
        let image = plan::pull_reference(&instance.spec, &self.settings.private_registries)
            .map_err(|reason| DockerError::Pull { image: String::new(), message: reason })?;
        let how = pull::Pull {
            policy: self.settings.pull,
            limit: self.settings.pull_deadline,
            logins: &self.logins,
        };
        pull::ensure_image(&self.engine, &image, &instance.spec.registry, how).await?;
        let name = container_name(&instance.id);
        // A container of this instance left by a launch that died half-way (agent killed).
        self.remove_owned(&name, &instance.id).await?;
        let image = pull::with_tag(&image);
        let quota = self.disk_quota.load(Ordering::Relaxed);
        match self.create(instance, &name, &image, quota).await {
            Err(DockerError::Engine { message, .. })
                if quota && plan::is_disk_quota_refusal(&message) =>
            {
                // Said once; later creates know it at admission.
                if self.disk_quota.swap(false, Ordering::Relaxed) {
                    self.warn_no_disk_limit(&message);
                }
                if !self.settings.unlimited_disk {
                    return Err(DockerError::Refused { reason: Self::no_disk_limit() });
                }
                self.create(instance, &name, &image, false).await?;
            }
            other => other?,
        }
        let start = self.engine.docker.start_container(&name, None);
        self.engine.call("start the container", CALL, start).await?;
        let info = self.engine.inspect(&name).await?;
        Ok(info.state.and_then(|s| s.started_at))
    }

    async fn create(
        &self,
        instance: &Instance,
        name: &str,
        image: &str,
        disk_quota: bool,
    ) -> Result<(), DockerError> {
        let network = match &self.settings.network {
            Some(net) => {
                Some(network::ensure(&self.engine, net.settings(), &self.settings.owner).await?)
            }
            None => None,
        };
        let body = plan::create_body(
            instance,
            image,
            &self.settings.owner,
            disk_quota,
            network.as_deref(),
        );
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let create = self.engine.docker.create_container(Some(options), body);
        self.engine.call("create the container", CALL, create).await.map(drop)
    }

    /// Isolates the ports of the agent's Docker network from each other (a port that joined
    /// since the last time, this container's veth, among them).
    pub(super) async fn isolate(&self, net: &HostNetwork) -> Result<(), DockerError> {
        let bridge = &net.settings().container_bridge;
        let isolated = crate::network::link::isolate_ports(bridge).await;
        isolated.map_err(|e| DockerError::Network { detail: e.to_string() })
    }

    /// The run the container is in (`StartedAt`, restart count) when it is up; `None` while it
    /// is still starting; an error with the exit code and last output when it is not running.
    pub(super) async fn check_up(&self, name: &str) -> Result<Option<(String, i64)>, BackendError> {
        let info = self.engine.inspect(name).await.map_err(|e| e.during("check the container"))?;
        let restarts = info.restart_count.unwrap_or(0);
        let state = info.state.unwrap_or_default();
        if watch::is_up(&state) {
            return Ok(Some((state.started_at.unwrap_or_default(), restarts)));
        }
        if matches!(state.status, Some(bollard::models::ContainerStateStatusEnum::CREATED)) {
            return Ok(None);
        }
        let logs = self.engine.logs_tail(name, 5).await;
        Err(BackendError::Gone { detail: watch::exit_reason(&state, &logs) })
    }
}

#[async_trait]
impl Lifecycle for DockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    fn validate(&self, spec: &Spec) -> Result<(), BackendError> {
        plan::image_of(spec)
            .map_err(|reason| BackendError::Unsupported { field: "image", reason })?;
        let private = &self.settings.private_registries;
        plan::check_registry(spec, private)
            .map_err(|reason| BackendError::Unsupported { field: "registry", reason })?;
        plan::pull_reference(spec, private)
            .map_err(|reason| BackendError::Unsupported { field: "image", reason })?;
        plan::check_env(spec)
            .map_err(|reason| BackendError::Unsupported { field: "env_variables", reason })?;
        if !self.disk_quota.load(Ordering::Relaxed) && !self.settings.unlimited_disk {
            let reason = Self::no_disk_limit();
            return Err(BackendError::Unsupported { field: "storage_gb", reason });
        }
        if spec.registry.password.is_some() && spec.registry.login.is_none() {
            let reason = "is required with password".to_owned();
            return Err(BackendError::Unsupported { field: "login", reason });
        }
        Ok(())
    }

    fn check_gpus(&self, gpus: &[String]) -> Result<(), BackendError> {
        plan::check_gpus(gpus, &self.settings.host_gpus)
            .map_err(|reason| BackendError::Refused { reason })
    }

    async fn launch(&self, instance: &Instance) -> Result<Arc<dyn Machine>, BackendError> {
        // Its rules before its first packet.
        if let Some(net) = &self.settings.network {
            net.plug_container(&instance.id)
                .await
                .map_err(|e| BackendError::op("put the container under the agent's rules", e))?;
        }
        let started = self.create_and_start(instance).await;
        let started = match (started, &self.settings.network) {
            (Ok(at), Some(net)) => self.isolate(net).await.map(|()| at),
            (other, _) => other,
        };
        match started {
            Ok(started_at) => {
                tracing::info!(id = %instance.id, "container started");
                Ok(self.machine(instance, started_at, false))
            }
            Err(e) => {
                tracing::warn!(id = %instance.id, error = %e, "container launch failed; removing it");
                let name = container_name(&instance.id);
                if let Err(cleanup) = self.remove_owned(&name, &instance.id).await {
                    tracing::error!(id = %instance.id, error = %cleanup, "launch rollback incomplete");
                } else if let Some(net) = &self.settings.network
                    && let Err(cleanup) = net.unplug_container(&instance.id).await
                {
                    tracing::error!(id = %instance.id, error = %cleanup, "launch rollback incomplete");
                }
                Err(e.during("create the container"))
            }
        }
    }

    async fn boot(&self, instance: &Instance) -> Result<Arc<dyn Machine>, BackendError> {
        let name = container_name(&instance.id);
        let info = self.engine.inspect(&name).await.map_err(|e| e.during("start"))?;
        if !info.state.as_ref().is_some_and(watch::is_up) {
            let start = self.engine.docker.start_container(&name, None);
            self.engine
                .call("start the container", CALL, start)
                .await
                .map_err(|e| e.during("start"))?;
        }
        let info = self.engine.inspect(&name).await.map_err(|e| e.during("start"))?;
        Ok(self.machine(instance, info.state.and_then(|s| s.started_at), false))
    }

    async fn destroy(
        &self,
        instance: &Instance,
        machine: Option<Arc<dyn Machine>>,
    ) -> Result<(), BackendError> {
        // Its watch quiet first: what follows is not the container stopping on its own.
        if let Some(machine) = machine {
            machine.stop().await?;
        }
        let name = container_name(&instance.id);
        match self.remove_owned(&name, &instance.id).await {
            Err(e @ DockerError::Foreign { .. }) => {
                tracing::warn!(id = %instance.id, error = %e, "not removed");
                Ok(())
            }
            Err(e) => Err(e.during("remove the container")),
            Ok(()) => {
                tracing::info!(id = %instance.id, "container and its anonymous volumes removed");
                if let Some(net) = &self.settings.network {
                    net.unplug_container(&instance.id)
                        .await
                        .map_err(|e| BackendError::op("take the container off the rules", e))?;
                }
                let spec = &instance.spec;
                match plan::pull_reference(spec, &self.settings.private_registries) {
                    Ok(image) => pull::remove_private_image(
                        &self.engine,
                        &image,
                        &spec.registry,
                        &self.logins,
                    )
                    .await
                    .map_err(|e| e.during("remove the image pulled with a login")),
                    Err(_) => Ok(()),
                }
            }
        }
    }

    async fn adopt(&self, instance: &Instance) -> Result<Adoption, BackendError> {
        // Its image was pulled with a login before this agent started: never a stand-in.
        let spec = &instance.spec;
        if spec.registry.login.is_some()
            && let Ok(image) = plan::pull_reference(spec, &self.settings.private_registries)
        {
            self.logins.insert(&image);
        }
        let name = container_name(&instance.id);
        let info = match self.engine.inspect(&name).await {
            Ok(info) => info,
            Err(DockerError::NotFound { .. }) => {
                return Ok(Adoption::Gone { detail: format!("no container named {name}") });
            }
            Err(e) => {
                // Watched anyway: when the engine is back, the instance is configured again.
                let machine = self.machine(instance, None, true);
                return Ok(Adoption::Unsure { machine, error: e.during("find the container") });
            }
        };
        let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
        if !plan::is_ours(&labels, &instance.id, &self.settings.owner) {
            let detail = DockerError::Foreign { name }.to_string();
            return Ok(Adoption::Gone { detail });
        }
        let state = info.state.unwrap_or_default();
        if !watch::is_up(&state) && state.restarting != Some(true) {
            let logs = self.engine.logs_tail(&name, 5).await;
            return Ok(Adoption::Gone { detail: watch::exit_reason(&state, &logs) });
        }
        if let Some(net) = &self.settings.network {
            let plugged = match net.plug_container(&instance.id).await {
                Ok(()) => self.isolate(net).await.map_err(|e| e.during("isolate")),
                Err(e) => Err(BackendError::op("put the container under the agent's rules", e)),
            };
            if let Err(error) = plugged {
                let machine = self.machine(instance, state.started_at, false);
                return Ok(Adoption::Unsure { machine, error });
            }
        }
        tracing::info!(id = %instance.id, "container adopted");
        Ok(Adoption::Adopted(self.machine(instance, state.started_at, false)))
    }
}

/// The engine's containers with this agent's labels: the same engine connection, nothing
/// half-built.
#[async_trait]
impl HostSweeper for DockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    async fn find_owned(&self) -> Result<Vec<Owned>, BackendError> {
        let found = owned::find(&self.engine, &self.settings.owner).await;
        found.map_err(|e| e.during("list containers"))
    }

    async fn reap(&self, orphan: &Owned) -> Result<(), BackendError> {
        let (owner, grace) = (&self.settings.owner, self.settings.stop_grace);
        owned::settle(&self.engine, owner, &orphan.instance_id, grace, Fate::Removed)
            .await
            .map_err(|e| e.during("remove the orphan container"))
    }

    async fn halt(&self, kept: &Owned) -> Result<(), BackendError> {
        let (owner, grace) = (&self.settings.owner, self.settings.stop_grace);
        owned::settle(&self.engine, owner, &kept.instance_id, grace, Fate::Stopped)
            .await
            .map_err(|e| e.during("stop the container"))
    }

    async fn tear_down(&self, instance: &Instance) -> Result<(), BackendError> {
        Lifecycle::destroy(self, instance, None).await
    }
}
