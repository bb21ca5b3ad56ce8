//! Getting the image: nothing to do when the engine has it (as `docker run` does), else a pull
//! with its progress in the log. Registry credentials go to the engine in its auth header,
//! never on a command line or in a log.

use std::collections::HashMap;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::engine::{CALL, Engine};
use super::error::DockerError;
use crate::instance::spec::Registry;

/// Between two progress lines of the same layer.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `busybox` → `busybox:latest`: without a tag the engine would pull every tag.
pub fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || image.contains('@') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

fn credentials(registry: &Registry) -> Option<DockerCredentials> {
    let login = registry.login.clone()?;
    Some(DockerCredentials {
        username: Some(login),
        password: registry.password.as_ref().map(|p| p.expose().to_owned()),
        serveraddress: registry.registry.clone(),
        ..Default::default()
    })
}

/// Makes sure the engine has `image`, pulling it within `limit` when it does not.
pub async fn ensure_image(
    engine: &Engine,
    image: &str,
    registry: &Registry,
    limit: Duration,
) -> Result<(), DockerError> {
    let reference = with_tag(image);
    // With a login, the registry checks it on every pull: an image another renter pulled with
    // their login is never taken from the engine's store (and it is removed with its
    // instance, see `remove_private_image`).
    if registry.login.is_none() {
        let inspect = engine.docker.inspect_image(&reference);
        match engine.call("inspect the image", CALL, inspect).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    tracing::info!(image = %reference, "pulling the image");
    let options = CreateImageOptionsBuilder::new().from_image(&reference).build();
    let mut stream = engine.docker.create_image(Some(options), None, credentials(registry));
    let until = Instant::now() + limit;
    let pull_error = |message: String| DockerError::Pull { image: reference.clone(), message };
    let mut last: HashMap<String, (String, Instant)> = HashMap::new();
    loop {
        let item = match tokio::time::timeout_at(until, stream.next()).await {
            Err(_) => {
                return Err(DockerError::Timeout {
                    what: "pull the image",
                    seconds: limit.as_secs(),
                });
            }
            Ok(None) => break,
            Ok(Some(item)) => item,
        };
        let info = match item {
            Ok(info) => info,
            Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                return Err(pull_error(message.trim().to_owned()));
            }
            Err(e) => return Err(DockerError::from_bollard(e, "pull the image", &engine.socket)),
        };
        if let Some(detail) = info.error_detail {
            return Err(pull_error(detail.message.unwrap_or_else(|| "unknown error".into())));
        }
        let layer = info.id.unwrap_or_default();
        let status = info.status.unwrap_or_default();
        // One line per layer and stage, then at most one every few seconds.
        let due = match last.get(&layer) {
            Some((seen, at)) => *seen != status || at.elapsed() >= PROGRESS_EVERY,
            None => true,
        };
        if due {
            let progress =
                info.progress_detail.map(|p| (p.current.unwrap_or(0), p.total.unwrap_or(0)));
            tracing::info!(image = %reference, %layer, %status, ?progress, "pull");
            last.insert(layer, (status, Instant::now()));
        }
    }
    tracing::info!(image = %reference, "image pulled");
    Ok(())
}

/// Removes an image pulled with a renter's login once its instance is gone, so nobody else on
/// this host runs it without the registry's say. An image still used by a container stays.
pub async fn remove_private_image(
    engine: &Engine,
    image: &str,
    registry: &Registry,
) -> Result<(), DockerError> {
    if registry.login.is_none() {
        return Ok(());
    }
    let reference = with_tag(image);
    let options = bollard::query_parameters::RemoveImageOptionsBuilder::default().build();
    let remove = engine.docker.remove_image(&reference, Some(options), None);
    match engine.call("remove the private image", CALL, remove).await {
        Ok(_) => {
            tracing::info!(image = %reference, "image pulled with a login removed");
            Ok(())
        }
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn a_reference_without_tag_gets_latest() {
        assert_eq!(with_tag("busybox"), "busybox:latest");
        assert_eq!(with_tag("reg:5000/team/app"), "reg:5000/team/app:latest");
        assert_eq!(with_tag("reg:5000/team/app:1"), "reg:5000/team/app:1");
        assert_eq!(with_tag("app@sha256:abc"), "app@sha256:abc");
    }

    #[test]
    fn credentials_only_with_a_login() {
        let mut registry = Registry { registry: Some("reg:5000".into()), ..Default::default() };
        assert!(credentials(&registry).is_none());
        registry.login = Some("bob".into());
        registry.password = Some(Secret::new("hunter2"));
        let c = credentials(&registry).unwrap();
        assert_eq!(c.username.as_deref(), Some("bob"));
        assert_eq!(c.password.as_deref(), Some("hunter2"));
        assert_eq!(c.serveraddress.as_deref(), Some("reg:5000"));
    }
}
