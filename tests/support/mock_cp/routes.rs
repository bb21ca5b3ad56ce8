//! The mock's routes: `/ping`, `/init`, `/init/host`, `/stats` under `/v0`.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Inner, PREFIX, Recorded, Shared, remember_secret};

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

pub(super) async fn handle(
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
            let (token, subdomain) =
                inner.frp.get_or_insert_with(|| (fresh("frptok-"), fresh("h"))).clone();
            remember_secret(&secret);
            remember_secret(&token);
            if !secret.is_empty() {
                inner.secrets.insert(secret.clone());
            }
            let frp = json!({"server_addr": "127.0.0.1", "server_port": 7000, "token": token,
                             "subdomain": subdomain});
            ok(Some(json!({
                "secret_key": secret,
                "host_exists": inner.behaviour.host_exists,
                "instance_running": inner.behaviour.instance_running,
                "frp": if inner.behaviour.without_frp { Value::Null } else { frp },
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
