//! Test stand-in for frpc ≥ 0.52 (no frp binary can be installed where the tests run).
//!
//! `frpc_standin -c <main.toml>`: parses the main file and its includes STRICTLY with frp's key
//! names (an unknown key fails, as `strictConfig` does), serves the admin routes the agent uses
//! (`GET /api/reload`, `GET /api/status`) with basic auth on `webServer`, and tracks proxies the
//! way frpc does on reload: unchanged proxies keep running, new ones pass through `wait start`.
//!
//! Driven by `standin-control.json` beside the config (re-read all the time):
//! `{"crash": true}` exits with status 3 (at start too), `{"refuse_remote_ports": [10002]}`
//! makes those tcp proxies fail with frps's "port already used".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Main {
    server_addr: String,
    server_port: u16,
    login_fail_exit: Option<bool>,
    #[serde(default)]
    includes: Vec<String>,
    auth: Option<Auth>,
    web_server: WebServer,
    #[serde(default)]
    proxies: Vec<Proxy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Auth {
    method: String,
    token: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebServer {
    addr: String,
    port: u16,
    user: String,
    password: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Proxy {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "localIP")]
    local_ip: Option<String>,
    local_port: u16,
    remote_port: Option<u16>,
    #[serde(default)]
    custom_domains: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Include {
    #[serde(default)]
    proxies: Vec<Proxy>,
}

#[derive(Default, Deserialize)]
struct Control {
    #[serde(default)]
    crash: bool,
    #[serde(default)]
    refuse_remote_ports: Vec<u16>,
}

struct Entry {
    proxy: Proxy,
    since: Instant,
}

struct App {
    config: PathBuf,
    web: WebServer,
    server_addr: String,
    proxies: Mutex<BTreeMap<String, Entry>>,
}

fn log(level: char, msg: &str) {
    let now = chrono::Utc::now().format("%Y/%m/%d %H:%M:%S");
    println!("{now} [{level}] [standin] {msg}");
}

fn control(config: &Path) -> Control {
    let path = config.with_file_name("standin-control.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// `dir/prefix*suffix`, the only glob shape the agent writes.
fn expand(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let (dir, file) = pattern.rsplit_once('/').ok_or(format!("bad include {pattern}"))?;
    let (pre, suf) = file.split_once('*').unwrap_or((file, ""));
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !n.starts_with('.')
                    && n.starts_with(pre)
                    && n.ends_with(suf)
                    && n.len() >= pre.len() + suf.len()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    Ok(out)
}

fn check(p: &Proxy) -> Result<(), String> {
    match p.kind.as_str() {
        "tcp" if p.remote_port.is_none() => {
            Err(format!("proxy [{}]: remotePort is required", p.name))
        }
        "http" if p.custom_domains.is_empty() => Err(format!(
            "proxy [{}]: custom domains and subdomain should set at least one of them",
            p.name
        )),
        "tcp" | "http" => Ok(()),
        other => Err(format!("proxy [{}]: unsupported type {other}", p.name)),
    }
}

fn load(config: &Path) -> Result<(Main, Vec<Proxy>), String> {
    let text = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
    let main: Main = toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    if let Some(a) = &main.auth
        && (a.method != "token" || a.token.is_empty())
    {
        return Err("auth.method must be token with a token".into());
    }
    let mut all = main.proxies.clone();
    for pattern in &main.includes {
        for file in expand(pattern)? {
            let t = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            let inc: Include =
                toml::from_str(&t).map_err(|e| format!("{}: {e}", file.display()))?;
            all.extend(inc.proxies);
        }
    }
    let mut seen = std::collections::HashSet::new();
    for p in &all {
        check(p)?;
        if !seen.insert(p.name.clone()) {
            return Err(format!("proxy [{}] is defined twice", p.name));
        }
    }
    Ok((main, all))
}

fn apply(app: &App, proxies: Vec<Proxy>) {
    let mut map = app.proxies.lock().unwrap();
    let mut next = BTreeMap::new();
    for p in proxies {
        match map.remove(&p.name) {
            Some(old) if old.proxy == p => next.insert(p.name.clone(), old),
            _ => {
                log('I', &format!("[{}] start proxy", p.name));
                next.insert(p.name.clone(), Entry { proxy: p, since: Instant::now() })
            }
        };
    }
    for name in map.keys() {
        log('I', &format!("[{name}] proxy closed"));
    }
    *map = next;
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let want = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", app.web.user, app.web.password));
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Basic {want}"))
}

async fn reload(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if !authorized(&app, &headers) {
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    log('I', &format!("Http request [/api/reload] strictConfig={:?}", q.get("strictConfig")));
    match load(&app.config) {
        Ok((_, proxies)) => {
            apply(&app, proxies);
            StatusCode::OK.into_response()
        }
        Err(e) => {
            log('W', &format!("reload frpc proxy config error: {e}"));
            (StatusCode::BAD_REQUEST, e).into_response()
        }
    }
}

async fn status(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    let refused = control(&app.config).refuse_remote_ports;
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for e in app.proxies.lock().unwrap().values() {
        let p = &e.proxy;
        let refuse = p.kind == "tcp" && p.remote_port.is_some_and(|r| refused.contains(&r));
        let (phase, err) = if refuse {
            ("start error", "port already used")
        } else if e.since.elapsed() < Duration::from_millis(200) {
            ("wait start", "")
        } else {
            ("running", "")
        };
        let remote = match (p.kind.as_str(), p.remote_port) {
            ("tcp", Some(r)) if err.is_empty() => format!("{}:{r}", app.server_addr),
            _ => p.custom_domains.first().cloned().unwrap_or_default(),
        };
        out.entry(p.kind.clone()).or_default().push(serde_json::json!({
            "name": p.name, "type": p.kind, "status": phase, "err": err,
            "local_addr": format!("{}:{}", p.local_ip.as_deref().unwrap_or("127.0.0.1"), p.local_port),
            "plugin": "", "remote_addr": remote,
        }));
    }
    axum::Json(out).into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = match args.iter().position(|a| a == "-c" || a == "--config") {
        Some(i) if i + 1 < args.len() => PathBuf::from(&args[i + 1]),
        // Run by `cargo test --all-targets` as a (harness-less) test: nothing to check.
        _ => return,
    };
    if control(&config).crash {
        eprintln!("standin: crashing on demand");
        std::process::exit(3);
    }
    let (main, proxies) = load(&config).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    let _ = (main.server_port, main.login_fail_exit);
    let app = Arc::new(App {
        config: config.clone(),
        web: main.web_server.clone(),
        server_addr: main.server_addr.clone(),
        proxies: Mutex::new(BTreeMap::new()),
    });
    apply(&app, proxies);
    let listener =
        tokio::net::TcpListener::bind((main.web_server.addr.as_str(), main.web_server.port))
            .await
            .unwrap_or_else(|e| {
                eprintln!("admin bind: {e}");
                std::process::exit(1);
            });
    log('I', &format!("login to server success, admin on {}", listener.local_addr().unwrap()));
    let watch_cfg = config.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if control(&watch_cfg).crash {
                eprintln!("standin: crashing on demand");
                std::process::exit(3);
            }
        }
    });
    let router = axum::Router::new()
        .route("/api/reload", get(reload))
        .route("/api/status", get(status))
        .with_state(app);
    axum::serve(listener, router).await.unwrap();
}
