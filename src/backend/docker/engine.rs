//! A connection to the Docker engine where every call has a deadline and every failure is a
//! [`DockerError`]. bollard opens a fresh connection per request, so an engine that restarts
//! is answered again without reconnecting.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, ContainerSummary};
use bollard::query_parameters::{
    ContainerArchiveInfoOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, TopOptions,
    UploadToContainerOptionsBuilder,
};
use futures_util::StreamExt;

use super::error::DockerError;

/// Deadline of one plain API call (inspect, start, pause, …).
pub const CALL: Duration = Duration::from_secs(30);
/// Deadline of the first answer at start-up (`ping`): an engine that is up answers at once.
pub const PING: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Engine {
    pub docker: Docker,
    /// For messages: `unix:///var/run/docker.sock`.
    pub socket: String,
}

impl Engine {
    /// Connects, pings and agrees on an API version (the engine may be older than bollard).
    pub async fn connect(socket: &Path) -> Result<Engine, DockerError> {
        let shown = format!("unix://{}", socket.display());
        let unreachable =
            |detail: String| DockerError::Unreachable { socket: shown.clone(), detail };
        let path = socket.to_str().ok_or_else(|| unreachable("the path is not UTF-8".into()))?;
        let docker = Docker::connect_with_unix(path, CALL.as_secs(), bollard::API_DEFAULT_VERSION)
            .map_err(|e| unreachable(e.to_string()))?;
        let engine = Engine { docker, socket: shown.clone() };
        engine.call("answer a ping", PING, engine.docker.ping()).await?;
        let negotiated = tokio::time::timeout(PING, engine.docker.clone().negotiate_version())
            .await
            .map_err(|_| DockerError::Timeout { what: "agree on an API version", seconds: 5 })?
            .map_err(|e| DockerError::from_bollard(e, "agree on an API version", &shown))?;
        Ok(Engine { docker: negotiated, socket: shown })
    }

    /// Runs one bollard call under `limit`.
    pub async fn call<T>(
        &self,
        what: &'static str,
        limit: Duration,
        fut: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, DockerError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(result) => result.map_err(|e| DockerError::from_bollard(e, what, &self.socket)),
            Err(_) => Err(DockerError::Timeout { what, seconds: limit.as_secs() }),
        }
    }

    pub async fn inspect(&self, name: &str) -> Result<ContainerInspectResponse, DockerError> {
        let fut = self.docker.inspect_container(name, None);
        self.call("inspect the container", CALL, fut).await.map_err(|e| not_found(e, name))
    }

    /// Graceful stop (SIGTERM, then SIGKILL after `grace`) of a container that is kept; a
    /// paused one is resumed first so it can stop cleanly. What is already gone is fine.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        let paused = match self.inspect(name).await {
            Err(DockerError::NotFound { .. }) => return Ok(()),
            other => other?.state.and_then(|s| s.paused).unwrap_or(false),
        };
        if paused {
            let unpause = self.docker.unpause_container(name);
            self.call("unpause the container", CALL, unpause).await?;
        }
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let stop =
            self.docker.stop_container(name, Some(StopContainerOptionsBuilder::new().t(t).build()));
        match self.call("stop the container", grace + CALL, stop).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// [`Engine::stop`], then removal with its anonymous volumes. What is already gone is fine.
    pub async fn stop_and_remove(&self, name: &str, grace: Duration) -> Result<(), DockerError> {
        match self.stop(name, grace).await {
            Ok(()) => {}
            // A wedged container: the forced removal below kills it.
            Err(e) if !e.is_unreachable() => {
                tracing::warn!(%name, error = %e, "graceful stop failed")
            }
            Err(e) => return Err(e),
        }
        let options = RemoveContainerOptionsBuilder::new().v(true).force(true).build();
        match self
            .call("remove the container", CALL, self.docker.remove_container(name, Some(options)))
            .await
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// The last `lines` lines the container wrote (stdout and stderr), for an error message.
    pub async fn logs_tail(&self, name: &str, lines: usize) -> String {
        let options =
            LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&lines.to_string()).build();
        let mut stream = self.docker.logs(name, Some(options));
        let mut text = String::new();
        let collect = async {
            while let Some(Ok(chunk)) = stream.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), collect).await;
        let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        tail[tail.len().saturating_sub(lines)..].join(" | ")
    }

    /// Whether `path` exists in the container's filesystem (no program of the image needed).
    pub async fn path_exists(&self, name: &str, path: &str) -> Result<bool, DockerError> {
        let options = ContainerArchiveInfoOptionsBuilder::new().path(path).build();
        let fut = self.docker.get_container_archive_info(name, Some(options));
        match self.call("look into the container", CALL, fut).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Extracts a tar archive at `/` in the container.
    pub async fn upload(&self, name: &str, tar: Vec<u8>) -> Result<(), DockerError> {
        let options = UploadToContainerOptionsBuilder::new().path("/").build();
        let body = bollard::body_full(tar.into());
        let fut = self.docker.upload_to_container(name, Some(options), body);
        self.call("copy files into the container", CALL, fut).await
    }

    /// The command lines of the container's processes (read by the engine on the host).
    pub async fn processes(&self, name: &str) -> Result<Vec<String>, DockerError> {
        let fut = self.docker.top_processes(name, None::<TopOptions>);
        let top = self.call("list the container's processes", CALL, fut).await?;
        let titles = top.titles.unwrap_or_default();
        let column = titles.iter().position(|t| t == "CMD" || t == "COMMAND").unwrap_or(0);
        let rows = top.processes.unwrap_or_default();
        Ok(rows.into_iter().filter_map(|row| row.get(column).cloned()).collect())
    }

    /// Every container, running or not, carrying all `labels` (`key` or `key=value`).
    pub async fn labelled(&self, labels: &[String]) -> Result<Vec<ContainerSummary>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), labels.to_vec())]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        self.call("list containers", CALL, self.docker.list_containers(Some(options))).await
    }
}

fn not_found(e: DockerError, name: &str) -> DockerError {
    if e.is_not_found() { DockerError::NotFound { name: name.to_owned() } } else { e }
}
