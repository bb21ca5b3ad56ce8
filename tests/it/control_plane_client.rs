//! The library's control-plane client against the mock control plane: base URL handling,
//! auth headers, bounded retries on 5xx, no retry on a refusal, and the envelope's errors.

use std::time::Duration;

use qudata_agent::control_plane::backoff::Backoff;
use qudata_agent::control_plane::wire::{InitRequest, Stats};
use qudata_agent::control_plane::{Client, ClientError};
use qudata_agent::instance::Status;
use qudata_agent::secret::Secret;

use crate::support::mock_cp::{Behaviour, MockCp, remember_secret};

const FAST: Backoff = Backoff { initial: Duration::from_millis(5), max: Duration::from_millis(20) };

fn client(cp: &MockCp, key: &str) -> Client {
    remember_secret(key);
    Client::new(&cp.url, Secret::new(key), Duration::from_secs(10)).unwrap().with_backoff(FAST)
}

fn request() -> InitRequest {
    InitRequest {
        agent_id: uuid::Uuid::new_v4().to_string(),
        agent_port: 23456,
        address: "0.0.0.0".into(),
        fingerprint: "unknown".into(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        test_mode: true,
        backend: None,
        gpus: None,
    }
}

#[tokio::test]
async fn init_retries_transient_failures_a_bounded_number_of_times() {
    let cp = MockCp::start(Behaviour { fail_next: 2, ..Default::default() });
    let c = client(&cp, "ak-client-test-1");
    let init = c.init(&request()).await.unwrap();
    let secret = init.secret_key.unwrap();
    assert!(secret.expose().starts_with("sk-"));
    assert_eq!(cp.on("/init").len(), 3, "two 503s, then the answer");
    assert_eq!(cp.on("/init")[2].body["test_mode"], true);

    cp.set(|b| b.fail_next = 100);
    let err = c.init(&request()).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused { status: 503, .. }), "{err}");
    assert_eq!(cp.on("/init").len(), 3 + 4, "gives up after 4 tries");
}

#[tokio::test]
async fn a_refusal_is_not_retried_and_names_status_and_text() {
    let cp = MockCp::start(Behaviour::default());
    let c = client(&cp, "ak-client-test-2");
    let stats = Stats {
        gpu_health: Vec::new(),
        gpu_util: 0.0,
        gpu_temp: 0,
        cpu_util: 1.0,
        ram_util: 2.0,
        mem_util: 0.0,
        inet_in: 0,
        inet_out: 0,
        status: Status::Destroyed,
        gpus: Vec::new(),
    };
    let err = c.stats(&Secret::new("sk-never-issued"), &stats).await.unwrap_err();
    assert_eq!(err.to_string(), "the control plane answered /stats with 403: invalid agent secret");
    assert!(!err.is_transient());
    assert_eq!(cp.on("/stats").len(), 1);
    let s = cp.on("/stats").remove(0);
    assert_eq!(s.header("x-agent-secret"), Some("sk-never-issued"));
    assert_eq!(s.header("x-api-key"), None);
}

#[tokio::test]
async fn trailing_slash_and_no_trailing_slash_reach_the_same_paths() {
    let cp = MockCp::start(Behaviour::default());
    let bare = cp.url.trim_end_matches('/').to_owned();
    for base in [cp.url.clone(), bare] {
        let c =
            Client::new(&base, Secret::new("ak-client-test-3"), Duration::from_secs(10)).unwrap();
        c.ping().await.unwrap();
    }
    let pings = cp.on("/ping");
    assert_eq!(pings.len(), 2);
    assert!(pings.iter().all(|p| p.header("x-api-key") == Some("ak-client-test-3")));
}

#[tokio::test]
async fn nobody_listening_is_unreachable_and_transient() {
    let port = crate::support::agent::free_port();
    let c = Client::new(
        &format!("http://127.0.0.1:{port}/v0"),
        Secret::new("ak-x"),
        Duration::from_secs(2),
    )
    .unwrap();
    let err = c.ping().await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { path: "/ping", .. }), "{err}");
    assert!(err.is_transient());
    assert!(!err.to_string().contains("ak-x"));
}

/// A control plane (or something in its place) that answers with a redirect does not get the
/// credentials sent on: the redirect is an error, and nothing reaches its target.
#[tokio::test]
async fn a_redirect_is_not_followed_with_the_credentials() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_port = target.local_addr().unwrap().port();
    let reached = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&reached);
    tokio::spawn(async move {
        while let Ok((_stream, _)) = target.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let redirector = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", redirector.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = redirector.accept().await {
            let mut buf = vec![0u8; 8192];
            let _ = stream.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{target_port}/init\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let key = "ak-redirect-test-1";
    remember_secret(key);
    let c = Client::new(&url, Secret::new(key), Duration::from_secs(5)).unwrap().with_backoff(FAST);
    let err = c.init(&request()).await.unwrap_err();
    assert!(err.to_string().contains("307"), "{err}");
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the redirect was followed");
}
