//! Getting the image. Under [`PullPolicy::Always`] every create pulls, so the registry checks
//! the renter's credentials again and a moved tag is picked up (`docker run --pull always`);
//! under [`PullPolicy::Missing`] the engine's copy is used when present (air-gapped hosts that
//! preload images). An image with a login is pulled whatever the policy. Registry credentials
//! go to the engine in its auth header, never on a command line or in a log.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
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

/// When a create pulls its image (`QUDATA_DOCKER_PULL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Every create pulls; the engine's copy only when the registry cannot be reached.
    #[default]
    Always,
    /// The engine's copy when it has one; a pull only when it has none.
    Missing,
}

impl PullPolicy {
    pub fn parse(value: &str) -> Result<PullPolicy, String> {
        match value {
            "always" => Ok(PullPolicy::Always),
            "missing" => Ok(PullPolicy::Missing),
            _ => Err("is not a pull policy".into()),
        }
    }
}

/// What a failed pull says about the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullFailure {
    /// It could not be reached (refused, no such host, timeout, unreachable network).
    Unreachable,
    /// It answered 429: Docker Hub's pull rate limit.
    RateLimited,
    /// Anything else: it answered and said no (unauthorized, denied, unknown manifest), or
    /// something we do not know. Never a reason to use the engine's copy.
    Refused,
}

impl PullFailure {
    /// Whether the engine's copy may stand in for the pull.
    pub fn may_use_local(self) -> bool {
        matches!(self, PullFailure::Unreachable | PullFailure::RateLimited)
    }
}

/// Sorts the engine's message of a failed pull of `reference`. Every marker holds a space or
/// a colon-space, which no image reference can, and the reference is cut out first, so an
/// image name can never make a refusal look like an outage; an answer that says no wins over
/// any network words beside it.
pub fn classify(message: &str, reference: &str) -> PullFailure {
    let text = message.replace(reference, "").to_ascii_lowercase();
    const REFUSED: &[&str] = &[
        "unauthorized",
        "denied",
        "forbidden",
        "manifest unknown",
        "name unknown",
        "not found",
        "no basic auth credentials",
        "may require 'docker login'",
    ];
    const RATE_LIMITED: &[&str] = &["toomanyrequests: ", "429 too many requests"];
    const UNREACHABLE: &[&str] = &[
        "connection refused",
        "no such host",
        "temporary failure in name resolution",
        "server misbehaving",
        "i/o timeout",
        "tls handshake timeout",
        "network is unreachable",
        "no route to host",
        "while awaiting headers",
        "while waiting for connection",
    ];
    let any = |markers: &[&str]| markers.iter().any(|m| text.contains(m));
    if any(REFUSED) {
        PullFailure::Refused
    } else if any(RATE_LIMITED) {
        PullFailure::RateLimited
    } else if any(UNREACHABLE) {
        PullFailure::Unreachable
    } else {
        PullFailure::Refused
    }
}

/// References this agent pulled with a login that may still be in the engine's store (an
/// instance runs them, or their removal failed). The engine's copy of one never stands in for
/// a public pull, whatever the registry's state. Cheap to clone; in memory only: adoption
/// records the instances that outlive an agent restart.
#[derive(Clone, Debug, Default)]
pub struct LoginImages(Arc<Mutex<HashSet<String>>>);

impl LoginImages {
    pub fn insert(&self, image: &str) {
        self.lock().insert(with_tag(image));
    }

    fn contains(&self, reference: &str) -> bool {
        self.lock().contains(reference)
    }

    fn remove(&self, reference: &str) {
        self.lock().remove(reference);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A set of names stays consistent even if a holder panicked.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

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

/// How a create gets its image.
#[derive(Clone, Copy, Debug)]
pub struct Pull<'a> {
    pub policy: PullPolicy,
    /// For the whole pull.
    pub limit: Duration,
    pub logins: &'a LoginImages,
}

/// Makes sure the engine has `image` as `how.policy` says, pulling it within `how.limit`.
pub async fn ensure_image(
    engine: &Engine,
    image: &str,
    registry: &Registry,
    how: Pull<'_>,
) -> Result<(), DockerError> {
    let Pull { policy, limit, logins } = how;
    let reference = with_tag(image);
    // With a login, the registry checks it on every pull: an image another renter pulled with
    // their login is never taken from the engine's store (and it is removed with its
    // instance, see `remove_private_image`).
    let public = registry.login.is_none();
    if public && policy == PullPolicy::Missing && has_image(engine, &reference).await? {
        return Ok(());
    }
    if !public {
        // Before the pull: one that fails half-way may still have tagged the image.
        logins.insert(&reference);
    }
    let message = match pull(engine, &reference, registry, limit).await {
        Err(DockerError::Pull { message, .. }) => message,
        other => return other,
    };
    let failure = classify(&message, &reference);
    // Only a public image, only when the registry never said no: with several instances per
    // host, a copy another renter pulled with a login must not go to one whose pull was
    // refused.
    if public
        && policy == PullPolicy::Always
        && failure.may_use_local()
        && !logins.contains(&reference)
        && matches!(has_image(engine, &reference).await, Ok(true))
    {
        tracing::warn!(image = %reference, ?failure, reason = %message, "the registry cannot be reached; using the engine's copy of the image");
        return Ok(());
    }
    Err(DockerError::Pull { image: reference, message })
}

/// Whether the engine has `reference`.
async fn has_image(engine: &Engine, reference: &str) -> Result<bool, DockerError> {
    let inspect = engine.docker.inspect_image(reference);
    match engine.call("inspect the image", CALL, inspect).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Pulls `reference` within `limit`, its progress in the log.
async fn pull(
    engine: &Engine,
    reference: &str,
    registry: &Registry,
    limit: Duration,
) -> Result<(), DockerError> {
    tracing::info!(image = %reference, "pulling the image");
    let options = CreateImageOptionsBuilder::new().from_image(reference).build();
    let mut stream = engine.docker.create_image(Some(options), None, credentials(registry));
    let until = Instant::now() + limit;
    let pull_error = |message: String| DockerError::Pull { image: reference.to_owned(), message };
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
    logins: &LoginImages,
) -> Result<(), DockerError> {
    if registry.login.is_none() {
        return Ok(());
    }
    let reference = with_tag(image);
    let options = bollard::query_parameters::RemoveImageOptionsBuilder::default().build();
    let remove = engine.docker.remove_image(&reference, Some(options), None);
    match engine.call("remove the private image", CALL, remove).await {
        Ok(_) => tracing::info!(image = %reference, "image pulled with a login removed"),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    logins.remove(&reference);
    Ok(())
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
    /// What the engine says when a pull fails, as seen from dockerd 20-27 against Docker Hub,
    /// GHCR and the distribution registry, with what each allows.
    #[test]
    fn pull_failures_are_sorted_by_what_the_registry_said() {
        use PullFailure::*;
        let hub = "registry-1.docker.io";
        let table: &[(&str, &str, PullFailure)] = &[
            (
                "127.0.0.1:5000/test/app:1",
                r#"Get "http://127.0.0.1:5000/v2/": dial tcp 127.0.0.1:5000: connect: connection refused"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io on 127.0.0.53:53: no such host"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io: Temporary failure in name resolution"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io on 10.0.0.2:53: server misbehaving"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": dial tcp 54.227.20.253:443: i/o timeout"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": net/http: TLS handshake timeout"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": net/http: request canceled while waiting for connection (Client.Timeout exceeded while awaiting headers)"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                r#"Get "https://registry-1.docker.io/v2/": dial tcp [2600:1f18:2148:bc00::1]:443: connect: network is unreachable"#,
                Unreachable,
            ),
            (
                "ghcr.io/team/app:1",
                r#"Get "https://ghcr.io/v2/": dial tcp 140.82.113.33:443: connect: no route to host"#,
                Unreachable,
            ),
            (
                "pytorch/pytorch:2.1.0",
                "toomanyrequests: You have reached your pull rate limit. You may increase the limit by authenticating and upgrading: https://www.docker.com/increase-rate-limit",
                RateLimited,
            ),
            (
                "ghcr.io/team/app:1",
                r#"Head "https://ghcr.io/v2/team/app/manifests/1": received unexpected HTTP status: 429 Too Many Requests"#,
                RateLimited,
            ),
            (
                "team/app:1",
                "pull access denied for team/app, repository does not exist or may require 'docker login': denied: requested access to the resource is denied",
                Refused,
            ),
            (
                "reg.example.com/team/app:1",
                r#"Head "https://reg.example.com/v2/team/app/manifests/1": unauthorized: incorrect username or password"#,
                Refused,
            ),
            (
                "127.0.0.1:5000/test/app:1",
                r#"Head "http://127.0.0.1:5000/v2/test/app/manifests/1": no basic auth credentials"#,
                Refused,
            ),
            (
                "busybox:nope",
                "manifest for busybox:nope not found: manifest unknown: manifest unknown",
                Refused,
            ),
            (
                "127.0.0.1:5000/test/none:1",
                "manifest for 127.0.0.1:5000/test/none:1 not found: manifest unknown: manifest unknown",
                Refused,
            ),
            (
                "nvcr.io/team/app:1",
                r#"Head "https://nvcr.io/v2/team/app/manifests/1": denied: access forbidden"#,
                Refused,
            ),
            // A refusal that also carries network words is still a refusal.
            (
                "reg.example.com/app:1",
                "unauthorized: authentication required (upstream: i/o timeout)",
                Refused,
            ),
            // Something we do not know is not an outage.
            (
                "reg.example.com/app:1",
                r#"Head "https://reg.example.com/v2/app/manifests/1": received unexpected HTTP status: 500 Internal Server Error"#,
                Refused,
            ),
            // An image named like an outage cannot turn a refusal into one.
            (
                "reg.example.com/toomanyrequests/no-such-host:1",
                "manifest for reg.example.com/toomanyrequests/no-such-host:1 not found: manifest unknown",
                Refused,
            ),
        ];
        for (reference, message, expected) in table {
            assert_eq!(classify(message, reference), *expected, "{message}");
            assert_eq!(classify(message, reference).may_use_local(), *expected != Refused);
        }
        assert!(!classify("", hub).may_use_local());
    }

    #[test]
    fn login_images_are_known_by_their_tagged_reference() {
        let logins = LoginImages::default();
        logins.insert("reg:5000/team/app");
        let shared = logins.clone();
        assert!(shared.contains("reg:5000/team/app:latest"));
        assert!(!shared.contains("reg:5000/team/other:latest"));
        shared.remove("reg:5000/team/app:latest");
        assert!(!logins.contains("reg:5000/team/app:latest"));
    }

    #[test]
    fn the_pull_policy_is_always_or_missing() {
        assert_eq!(PullPolicy::default(), PullPolicy::Always);
        assert_eq!(PullPolicy::parse("always"), Ok(PullPolicy::Always));
        assert_eq!(PullPolicy::parse("missing"), Ok(PullPolicy::Missing));
        assert!(PullPolicy::parse("never").is_err());
        assert!(PullPolicy::parse("Always").is_err());
    }
}
