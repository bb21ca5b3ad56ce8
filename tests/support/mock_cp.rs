//! A mock Qudata control plane (PROTOCOL.md §1) for tests of the real binary.
//!
//! Runs axum on 127.0.0.1:0 in its own thread and runtime, so sync and async tests can use it.
//! Records every request; issues fresh `sk-…` secrets and one FRP token per mock; can be down
//! (503 for everything), fail the next N requests, answer slowly, send an empty `secret_key`,
//! say the host exists or an instance runs. Every secret, token and key it issues or receives is
//! appended to `$CARGO_TARGET_TMPDIR/issued-secrets` (one per line) for the log scan.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::wait::wait_until;

/// The path prefix the mock serves under, like the real `/v0`.
mod routes;

pub const PREFIX: &str = "/v0";

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Without the `/v0` prefix: `/ping`, `/init`, `/init/host`, `/stats`.
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub at: Instant,
    /// The status the mock answered.
    pub answered: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How the mock behaves; change it at any time with [`MockCp::set`].
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub host_exists: bool,
    pub empty_secret: bool,
    pub instance_running: Option<bool>,
    /// 503 for everything.
    pub down: bool,
    /// 503 for the next N requests, then normal.
    pub fail_next: u32,
    /// Delay before answering `/stats`.
    pub stats_latency: Duration,
    /// `/init` sends no `frp` object (a host without tunnels).
    pub without_frp: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            host_exists: false,
            empty_secret: false,
            instance_running: None,
            down: false,
            fail_next: 0,
            stats_latency: Duration::ZERO,
            without_frp: false,
        }
    }
}

#[derive(Default)]
pub(crate) struct Inner {
    behaviour: Behaviour,
    requests: Vec<Recorded>,
    /// Secrets this mock issued; any of them is accepted afterwards.
    secrets: BTreeSet<String>,
    stats_in_flight: u32,
    max_stats_in_flight: u32,
    /// This host's FRP token and subdomain: made at the first `/init`, the same ever after,
    /// as a control plane keeps them per host.
    frp: Option<(String, String)>,
}

pub(crate) type Shared = Arc<Mutex<Inner>>;

pub struct MockCp {
    /// Base URL to give the agent (with a trailing `/`, which the agent must tolerate).
    pub url: String,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A fresh API key, remembered for the log scan.
pub fn api_key() -> String {
    let key = format!("ak-test-{}", uuid::Uuid::new_v4().simple());
    remember_secret(&key);
    key
}

/// `/stats` requests the mock accepted, in receive order.
pub fn ok_stats(reqs: &[Recorded]) -> Vec<&Recorded> {
    reqs.iter().filter(|r| r.path == "/stats" && r.answered == 200).collect()
}

/// Requests to `path`.
pub fn count(reqs: &[Recorded], path: &str) -> usize {
    reqs.iter().filter(|r| r.path == path).count()
}

/// Appends `value` to the run's list of values that must never appear in a log.
pub fn remember_secret(value: &str) {
    if value.is_empty() {
        return;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(issued_secrets_file())
        .expect("issued-secrets file");
    // One write per value: tests (and test processes) append concurrently, and O_APPEND keeps a single
    // small write whole, where `writeln!` may split it and interleave lines.
    f.write_all(format!("{value}\n").as_bytes()).unwrap();
}

pub fn issued_secrets_file() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("issued-secrets")
}

impl MockCp {
    pub fn start(behaviour: Behaviour) -> MockCp {
        let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind mock control plane");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared: Shared = Arc::new(Mutex::new(Inner { behaviour, ..Default::default() }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(routes::handle).with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        MockCp {
            url: format!("http://127.0.0.1:{port}{PREFIX}/"),
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The agent's environment for production mode against this mock.
    pub fn agent_env(&self, api_key: &str, interval_ms: u64) -> Vec<(&'static str, String)> {
        vec![
            ("QUDATA_API_KEY", api_key.to_owned()),
            ("QUDATA_SERVICE_URL", self.url.clone()),
            ("QUDATA_STATS_INTERVAL_MS", interval_ms.to_string()),
            ("QUDATA_PUBLIC_ADDRESS", "203.0.113.7".to_owned()),
        ]
    }

    /// The one secret issued so far (panics if there are more or none).
    pub fn only_secret(&self) -> String {
        let secrets = self.secrets();
        assert_eq!(secrets.len(), 1, "{} secrets issued", secrets.len());
        secrets.into_iter().next().unwrap()
    }

    /// Changes the behaviour.
    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.shared.lock().unwrap().behaviour);
    }

    pub fn set_down(&self, down: bool) {
        self.set(|b| b.down = down);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Requests to `path`, in receive order.
    pub fn on(&self, path: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    /// Secrets issued so far, in no particular order.
    pub fn secrets(&self) -> BTreeSet<String> {
        self.shared.lock().unwrap().secrets.clone()
    }

    /// The most `/stats` requests it ever had open at once.
    pub fn max_stats_in_flight(&self) -> u32 {
        self.shared.lock().unwrap().max_stats_in_flight
    }

    /// Polls `check` on the recorded requests until it holds (deadline `within`); the requests
    /// it held on.
    pub async fn until(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let what = format!("{what} at the mock control plane");
        wait_until(what, within, Duration::from_millis(25), async || {
            let requests = self.requests();
            if check(&requests) { Ok(requests) } else { Err(summary(&requests)) }
        })
        .await
    }
}

/// The requests in order, runs of the same path and answer counted: `/ping 503 ×3, /init 200`.
fn summary(requests: &[Recorded]) -> String {
    let mut runs: Vec<(&str, u16, usize)> = Vec::new();
    for r in requests {
        match runs.last_mut() {
            Some((path, answered, n)) if *path == r.path && *answered == r.answered => *n += 1,
            _ => runs.push((&r.path, r.answered, 1)),
        }
    }
    let runs: Vec<String> = runs
        .into_iter()
        .map(|(path, answered, n)| match n {
            1 => format!("{path} {answered}"),
            n => format!("{path} {answered} ×{n}"),
        })
        .collect();
    format!("{} requests: {}", requests.len(), runs.join(", "))
}

impl Drop for MockCp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
