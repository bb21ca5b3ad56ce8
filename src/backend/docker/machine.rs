//! `DockerMachine`: one instance's container as its task holds it: the container's name and
//! its watch (which reports a container that stops or runs again on its own).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::query_parameters::RestartContainerOptionsBuilder;
use tokio::time::Instant;

use super::backend::DockerBackend;
use super::engine::CALL;
use super::owned::{self, Fate};
use super::sshd;
use super::watch::Watch;
use crate::backend::{BackendError, Machine};
use crate::instance::model::Instance;

/// How long a started container must stay in the same run before it counts as running.
const READY_SETTLE: Duration = Duration::from_millis(500);

pub struct DockerMachine {
    pub(super) backend: DockerBackend,
    pub(super) id: String,
    pub(super) name: String,
    /// Dropped with the machine, which ends the watch.
    pub(super) watch: Arc<Watch>,
}

#[async_trait]
impl Machine for DockerMachine {
    async fn wait_ready(&self, _: &Instance) -> Result<(), BackendError> {
        let name = &self.name;
        let until = Instant::now() + self.backend.settings.start_deadline;
        loop {
            if let Some(run) = self.backend.check_up(name).await? {
                // A command that fails at once must be an error, not a flash of `running`.
                tokio::time::sleep(READY_SETTLE).await;
                match self.backend.check_up(name).await? {
                    Some(again) if again == run => return Ok(()),
                    _ => {
                        let logs = self.backend.engine.logs_tail(name, 5).await;
                        let detail = format!(
                            "the container's command exited right after starting; last output: {logs}"
                        );
                        return Err(BackendError::Gone { detail });
                    }
                }
            }
            if Instant::now() >= until {
                let seconds = self.backend.settings.start_deadline.as_secs();
                let detail = "the container did not start running".to_owned();
                return Err(BackendError::NotReachable { seconds, detail });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn configure(&self, instance: &Instance) -> Result<(), BackendError> {
        let name = &self.name;
        // After every start: a container the engine started again has a new veth, not yet
        // isolated from the other ports of the agent's network.
        if let Some(net) = &self.backend.settings.network {
            self.backend.isolate(net).await.map_err(|e| e.during("isolate the container"))?;
        }
        if !instance.spec.ssh_enabled {
            return Ok(());
        }
        let sshd = sshd::ensure_installed(&self.backend.engine, name)
            .await
            .map_err(|e| e.during("set up SSH"))?;
        // Keys first: the server must never run with a stale key file.
        self.apply_ssh_keys(instance).await?;
        sshd::ensure_running(&self.backend.engine, name, sshd)
            .await
            .map_err(|e| e.during("start SSH"))
    }

    async fn apply_ssh_keys(&self, instance: &Instance) -> Result<(), BackendError> {
        let name = &self.name;
        if !instance.spec.ssh_enabled {
            return Ok(());
        }
        sshd::set_keys(&self.backend.engine, name, &instance.ssh_keys)
            .await
            .map_err(|e| e.during("apply SSH keys"))
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let name = &self.name;
        let pause = self.backend.engine.docker.pause_container(name);
        self.backend
            .engine
            .call("pause the container", CALL, pause)
            .await
            .map_err(|e| e.during("stop"))
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let name = &self.name;
        let unpause = self.backend.engine.docker.unpause_container(name);
        self.backend
            .engine
            .call("unpause the container", CALL, unpause)
            .await
            .map_err(|e| e.during("start"))
    }

    async fn reset(&self) -> Result<(), BackendError> {
        let name = &self.name;
        let grace = self.backend.settings.stop_grace;
        let restart = async {
            let info = self.backend.engine.inspect(name).await?;
            if info.state.and_then(|s| s.paused) == Some(true) {
                // The engine refuses to restart a paused container.
                let unpause = self.backend.engine.docker.unpause_container(name);
                self.backend.engine.call("unpause the container", CALL, unpause).await?;
            }
            let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
            let options = RestartContainerOptionsBuilder::new().t(t).build();
            let restart = self.backend.engine.docker.restart_container(name, Some(options));
            self.backend.engine.call("restart the container", grace + CALL, restart).await
        };
        let result = self.watch.quietly(&self.backend.engine, name, restart).await;
        result.map_err(|e| e.during("restart"))
    }

    async fn stop(&self) -> Result<(), BackendError> {
        self.stop_within(self.backend.settings.stop_grace).await
    }

    async fn stop_now(&self) -> Result<(), BackendError> {
        self.stop_within(Duration::ZERO).await
    }
}

impl DockerMachine {
    /// The engine's stop: SIGTERM, SIGKILL after `grace`.
    async fn stop_within(&self, grace: Duration) -> Result<(), BackendError> {
        self.watch.set_quiet();
        let owner = &self.backend.settings.owner;
        owned::settle(&self.backend.engine, owner, &self.id, grace, Fate::Stopped)
            .await
            .map_err(|e| e.during("stop the container"))
    }
}
