//! What this agent may touch: containers carrying its labels ([`plan::labels`]), found by the
//! engine's label filter and checked again before anything is stopped or removed.

use std::time::Duration;

use super::engine::Engine;
use super::error::DockerError;
use super::plan::{self, LABEL_INSTANCE, LABEL_OWNER};
use crate::backend::Owned;

/// Every container `owner` made, running or not.
pub async fn find(engine: &Engine, owner: &str) -> Result<Vec<Owned>, DockerError> {
    let filters = [LABEL_INSTANCE.to_owned(), format!("{LABEL_OWNER}={owner}")];
    let found = engine.labelled(&filters).await?;
    let owned = found.into_iter().filter_map(|c| {
        let id = c.labels.as_ref()?.get(LABEL_INSTANCE)?.clone();
        let short: String = c.id.unwrap_or_default().chars().take(12).collect();
        let state = c.state.map(|s| s.to_string()).unwrap_or_default();
        Some(Owned { instance_id: id, what: format!("container {short} ({state})") })
    });
    Ok(owned.collect())
}

/// What becomes of an instance's containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Stopped and removed with its anonymous volumes: an orphan.
    Removed,
    /// Stopped and kept with its writable layer (host maintenance): an explicit stop, so its
    /// `unless-stopped` policy does not run it again.
    Stopped,
}

/// Every container of instance `id` that `owner` made meets `fate`. Idempotent.
pub async fn settle(
    engine: &Engine,
    owner: &str,
    id: &str,
    grace: Duration,
    fate: Fate,
) -> Result<(), DockerError> {
    let filters = [format!("{LABEL_INSTANCE}={id}"), format!("{LABEL_OWNER}={owner}")];
    for container in engine.labelled(&filters).await? {
        let Some(cid) = container.id else { continue };
        match fate {
            Fate::Removed => engine.stop_and_remove(&cid, grace).await?,
            Fate::Stopped => engine.stop(&cid, grace).await?,
        }
        tracing::info!(%id, container = %cid, ?fate, "container of this agent stopped");
    }
    Ok(())
}

/// Stops and removes `name` if, and only if, its labels say it is instance `id` of `owner`.
pub async fn remove(
    engine: &Engine,
    name: &str,
    id: &str,
    owner: &str,
    grace: Duration,
) -> Result<(), DockerError> {
    let info = match engine.inspect(name).await {
        Err(DockerError::NotFound { .. }) => return Ok(()),
        other => other?,
    };
    let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
    if !plan::is_ours(&labels, id, owner) {
        return Err(DockerError::Foreign { name: name.to_owned() });
    }
    engine.stop_and_remove(name, grace).await
}
