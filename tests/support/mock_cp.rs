//! A mock Qudata control plane (PROTOCOL.md §1) for tests of the real binary.
//!
//! Runs axum on 127.0.0.1:0 in its own thread and runtime, so sync and async tests can use it.
//! Records every request; issues fresh `sk-…` secrets and FRP tokens; can be down (503 for
//! everything), fail the next N requests, answer slowly, send an empty `secret_key`, say the
//! host exists or an instance runs. Every secret, token and key it issues or receives is
//! appended to `$CARGO_TARGET_TMPDIR/issued-secrets` (one per line) for the log scan.

#![allow(dead_code)] // each test binary uses a different part of the support code

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The path prefix the mock serves under, like the real `/v0`.
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
        }
    }
}

#[derive(Default)]
struct Inner {
    behaviour: Behaviour,
    requests: Vec<Recorded>,
    /// Secrets this mock issued; any of them is accepted afterwards.
    secrets: BTreeSet<String>,
    stats_in_flight: u32,
    max_stats_in_flight: u32,
}

type Shared = Arc<Mutex<Inner>>;

pub struct MockCp {
    /// Base URL to give the agent (with a trailing `/`, which the agent must tolerate).
    pub url: String,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
    writeln!(f, "{value}").unwrap();
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
                let app = axum::Router::new().fallback(handle).with_state(state);
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

    /// Polls `check` on the recorded requests until it holds (deadline `within`).
    pub fn wait_for(&self, what: &str, within: Duration, check: impl Fn(&[Recorded]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if check(&self.requests()) {
                return;
            }
            assert!(Instant::now() < deadline, "mock control plane: timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl MockCp {
    /// [`MockCp::wait_for`] for async tests.
    pub async fn until(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let deadline = Instant::now() + within;
        loop {
            let requests = self.requests();
            if check(&requests) {
                return requests;
            }
            assert!(Instant::now() < deadline, "mock control plane: timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
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

fn envelope_error(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({"ok": false, "error": text}))).into_response()
}

fn ok(data: Option<Value>) -> Response {
    match data {
        Some(d) => axum::Json(json!({"ok": true, "data": d})).into_response(),
        None => axum::Json(json!({"ok": true})).into_response(),
    }
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().strip_prefix(PREFIX).unwrap_or("<outside /v0>").to_owned();
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("<binary>").to_owned()))
        .collect();
    for name in ["x-api-key", "x-agent-secret"] {
        if let Some(v) = headers.get(name) {
            remember_secret(v);
        }
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let is_stats = path == "/stats";
    let latency = {
        let mut inner = shared.lock().unwrap();
        if is_stats {
            inner.stats_in_flight += 1;
            inner.max_stats_in_flight = inner.max_stats_in_flight.max(inner.stats_in_flight);
        }
        inner.behaviour.stats_latency
    };
    if is_stats && !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut inner = shared.lock().unwrap();
    if is_stats {
        inner.stats_in_flight -= 1;
    }
    let response = answer(&mut inner, &method, &path, &headers);
    inner.requests.push(Recorded {
        method: method.to_string(),
        path,
        headers,
        body,
        at: Instant::now(),
        answered: response.status().as_u16(),
    });
    response
}

fn answer(
    inner: &mut Inner,
    method: &Method,
    path: &str,
    headers: &BTreeMap<String, String>,
) -> Response {
    if inner.behaviour.down {
        return envelope_error(StatusCode::SERVICE_UNAVAILABLE, "control plane is down");
    }
    if inner.behaviour.fail_next > 0 {
        inner.behaviour.fail_next -= 1;
        return envelope_error(StatusCode::SERVICE_UNAVAILABLE, "temporary failure");
    }
    let api_key_ok = headers.get("x-api-key").is_some_and(|k| k.starts_with("ak-"));
    let secret_ok = headers.get("x-agent-secret").is_some_and(|s| inner.secrets.contains(s));
    match (method.as_str(), path) {
        ("GET", "/ping") if api_key_ok => ok(None),
        ("POST", "/init") if api_key_ok => {
            let secret = if inner.behaviour.empty_secret { String::new() } else { fresh("sk-") };
            let token = fresh("frptok-");
            remember_secret(&secret);
            remember_secret(&token);
            if !secret.is_empty() {
                inner.secrets.insert(secret.clone());
            }
            ok(Some(json!({
                "secret_key": secret,
                "host_exists": inner.behaviour.host_exists,
                "instance_running": inner.behaviour.instance_running,
                "frp": {"server_addr": "127.0.0.1", "server_port": 7000, "token": token,
                        "subdomain": fresh("h")},
                "unknown_future_field": {"x": 1},
            })))
        }
        ("POST", "/init/host") | ("POST", "/stats") if secret_ok => ok(None),
        (_, "/ping") | (_, "/init") => envelope_error(StatusCode::UNAUTHORIZED, "invalid API key"),
        (_, "/init/host") | (_, "/stats") => {
            envelope_error(StatusCode::FORBIDDEN, "invalid agent secret")
        }
        _ => envelope_error(StatusCode::NOT_FOUND, "no such route"),
    }
}
