//! `DockerBackend`: the [`Backend`] that runs each instance as a container.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::query_parameters::{CreateContainerOptionsBuilder, RestartContainerOptionsBuilder};
use tokio::time::Instant;

use super::engine::{CALL, Engine};
use super::error::DockerError;
use super::owned::{self, Fate};
use super::plan::{self, container_name};
use super::watch::{self, Watch};
use super::{pull, sshd};
use crate::backend::{Adoption, BackendError, EventSink, HostSweeper, Lifecycle, Owned};
use crate::instance::model::{BackendKind, Instance};
use crate::instance::spec::Spec;

/// How long a started container must stay in the same run before it counts as running.
const READY_SETTLE: Duration = Duration::from_millis(500);

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
    /// Every NVIDIA GPU of the host (PCI addresses). The device request gives a container all
    /// of them, so a container may only be given all of them or none.
    pub host_gpus: Vec<String>,
}

impl DockerSettings {
    pub fn new(socket: PathBuf, owner: String) -> DockerSettings {
        DockerSettings {
            socket,
            owner,
            start_deadline: Duration::from_secs(120),
            stop_grace: Duration::from_secs(10),
            pull_deadline: Duration::from_secs(30 * 60),
            host_gpus: Vec::new(),
        }
    }
}

pub struct DockerBackend {
    settings: DockerSettings,
    engine: Engine,
    events: EventSink,
    watches: Mutex<HashMap<String, Arc<Watch>>>,
    /// Until the engine refuses one, containers get `storage_gb` as a disk limit.
    disk_quota: AtomicBool,
}

impl DockerBackend {
    /// Connects to the engine; fails when it does not answer within a few seconds.
    pub async fn connect(settings: DockerSettings, events: EventSink) -> Result<Self, DockerError> {
        let engine = Engine::connect(&settings.socket).await?;
        Ok(DockerBackend {
            settings,
            engine,
            events,
            watches: Mutex::default(),
            disk_quota: AtomicBool::new(true),
        })
    }

    fn watch(&self, instance: &Instance, started_at: Option<String>, known_down: bool) {
        let name = container_name(&instance.id);
        let id = instance.id.clone();
        let watch = Watch::spawn(
            self.engine.clone(),
            id.clone(),
            name,
            self.events.clone(),
            started_at,
            known_down,
        );
        self.watches.lock().expect("watches").insert(id, watch);
    }

    fn watch_of(&self, id: &str) -> Option<Arc<Watch>> {
        self.watches.lock().expect("watches").get(id).cloned()
    }

    /// Stops and removes `name` if, and only if, it is this agent's container for `id`.
    async fn remove_owned(&self, name: &str, id: &str) -> Result<(), DockerError> {
        let (owner, grace) = (&self.settings.owner, self.settings.stop_grace);
        owned::remove(&self.engine, name, id, owner, grace).await
    }

    async fn create_and_start(&self, instance: &Instance) -> Result<Option<String>, DockerError> {
        let image = plan::pull_reference(&instance.spec)
            .map_err(|reason| DockerError::Pull { image: String::new(), message: reason })?;
        pull::ensure_image(
            &self.engine,
            &image,
            &instance.spec.registry,
            self.settings.pull_deadline,
        )
        .await?;
        let name = container_name(&instance.id);
        // A container of this instance left by a launch that died half-way (agent killed).
        self.remove_owned(&name, &instance.id).await?;
        let image = pull::with_tag(&image);
        let quota = self.disk_quota.load(Ordering::Relaxed);
        match self.create(instance, &name, &image, quota).await {
            Err(DockerError::Engine { message, .. })
                if quota && plan::is_disk_quota_refusal(&message) =>
            {
                // Said once: every later container is made without the limit.
                if self.disk_quota.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        engine = %message,
                        "the Docker engine cannot limit a container's disk (its storage driver \
                         needs overlay2 on xfs mounted with pquota, btrfs or zfs): storage_gb \
                         is not enforced for containers"
                    );
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
        let body = plan::create_body(instance, image, &self.settings.owner, disk_quota);
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let create = self.engine.docker.create_container(Some(options), body);
        self.engine.call("create the container", CALL, create).await.map(drop)
    }

    /// The run the container is in (`StartedAt`, restart count) when it is up; `None` while it
    /// is still starting; an error with the exit code and last output when it is not running.
    async fn check_up(&self, name: &str) -> Result<Option<(String, i64)>, BackendError> {
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
        plan::check_registry(spec)
            .map_err(|reason| BackendError::Unsupported { field: "registry", reason })?;
        plan::pull_reference(spec)
            .map_err(|reason| BackendError::Unsupported { field: "image", reason })?;
        plan::check_env(spec)
            .map_err(|reason| BackendError::Unsupported { field: "env_variables", reason })?;
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

    async fn launch(&self, instance: &Instance) -> Result<(), BackendError> {
        match self.create_and_start(instance).await {
            Ok(started_at) => {
                self.watch(instance, started_at, false);
                tracing::info!(id = %instance.id, "container started");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(id = %instance.id, error = %e, "container launch failed; removing it");
                let name = container_name(&instance.id);
                if let Err(cleanup) = self.remove_owned(&name, &instance.id).await {
                    tracing::error!(id = %instance.id, error = %cleanup, "launch rollback incomplete");
                }
                Err(e.during("create the container"))
            }
        }
    }

    async fn wait_ready(&self, instance: &Instance) -> Result<(), BackendError> {
        let name = container_name(&instance.id);
        let until = Instant::now() + self.settings.start_deadline;
        loop {
            if let Some(run) = self.check_up(&name).await? {
                // A command that fails at once must be an error, not a flash of `running`.
                tokio::time::sleep(READY_SETTLE).await;
                match self.check_up(&name).await? {
                    Some(again) if again == run => return Ok(()),
                    _ => {
                        let logs = self.engine.logs_tail(&name, 5).await;
                        let detail = format!(
                            "the container's command exited right after starting; last output: {logs}"
                        );
                        return Err(BackendError::Gone { detail });
                    }
                }
            }
            if Instant::now() >= until {
                let seconds = self.settings.start_deadline.as_secs();
                let detail = "the container did not start running".to_owned();
                return Err(BackendError::NotReachable { seconds, detail });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn configure(&self, instance: &Instance) -> Result<(), BackendError> {
        if !instance.spec.ssh_enabled {
            return Ok(());
        }
        let name = container_name(&instance.id);
        let sshd = sshd::ensure_installed(&self.engine, &name)
            .await
            .map_err(|e| e.during("set up SSH"))?;
        // Keys first: the server must never run with a stale key file.
        self.apply_ssh_keys(instance).await?;
        sshd::ensure_running(&self.engine, &name, sshd).await.map_err(|e| e.during("start SSH"))
    }

    async fn apply_ssh_keys(&self, instance: &Instance) -> Result<(), BackendError> {
        if !instance.spec.ssh_enabled {
            return Ok(());
        }
        let name = container_name(&instance.id);
        sshd::set_keys(&self.engine, &name, &instance.ssh_keys)
            .await
            .map_err(|e| e.during("apply SSH keys"))
    }

    async fn pause(&self, instance: &Instance) -> Result<(), BackendError> {
        let name = container_name(&instance.id);
        let pause = self.engine.docker.pause_container(&name);
        self.engine.call("pause the container", CALL, pause).await.map_err(|e| e.during("stop"))
    }

    async fn resume(&self, instance: &Instance) -> Result<(), BackendError> {
        let name = container_name(&instance.id);
        let unpause = self.engine.docker.unpause_container(&name);
        self.engine
            .call("unpause the container", CALL, unpause)
            .await
            .map_err(|e| e.during("start"))
    }

    async fn reset(&self, instance: &Instance) -> Result<(), BackendError> {
        let name = container_name(&instance.id);
        let grace = self.settings.stop_grace;
        let restart = async {
            let info = self.engine.inspect(&name).await?;
            if info.state.and_then(|s| s.paused) == Some(true) {
                // The engine refuses to restart a paused container.
                let unpause = self.engine.docker.unpause_container(&name);
                self.engine.call("unpause the container", CALL, unpause).await?;
            }
            let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
            let options = RestartContainerOptionsBuilder::new().t(t).build();
            let restart = self.engine.docker.restart_container(&name, Some(options));
            self.engine.call("restart the container", grace + CALL, restart).await
        };
        let result = match self.watch_of(&instance.id) {
            Some(watch) => watch.quietly(&self.engine, &name, restart).await,
            None => restart.await,
        };
        result.map_err(|e| e.during("restart"))
    }

    async fn boot(&self, instance: &Instance) -> Result<(), BackendError> {
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
        self.watch(instance, info.state.and_then(|s| s.started_at), false);
        Ok(())
    }

    async fn destroy(&self, instance: &Instance) -> Result<(), BackendError> {
        if let Some(watch) = self.watches.lock().expect("watches").remove(&instance.id) {
            watch.set_quiet();
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
                Ok(())
            }
        }
    }

    async fn adopt(&self, instance: &Instance) -> Result<Adoption, BackendError> {
        let name = container_name(&instance.id);
        let info = match self.engine.inspect(&name).await {
            Ok(info) => info,
            Err(DockerError::NotFound { .. }) => {
                return Ok(Adoption::Gone { detail: format!("no container named {name}") });
            }
            Err(e) => {
                // Watch anyway: when the engine is back, the instance is configured again.
                self.watch(instance, None, true);
                return Err(e.during("find the container"));
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
        self.watch(instance, state.started_at, false);
        tracing::info!(id = %instance.id, "container adopted");
        Ok(Adoption::Adopted)
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
        if let Some(watch) = self.watch_of(&kept.instance_id) {
            watch.set_quiet();
        }
        owned::settle(&self.engine, owner, &kept.instance_id, grace, Fate::Stopped)
            .await
            .map_err(|e| e.during("stop the container"))
    }

    async fn tear_down(&self, instance: &Instance) -> Result<(), BackendError> {
        Lifecycle::destroy(self, instance).await
    }
}
