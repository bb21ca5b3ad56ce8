//! HTTP client of the control plane (PROTOCOL.md §1): auth headers, envelope, timeouts and
//! bounded retries. Bodies are never logged: `/init` answers carry the secret and FRP token.

use std::time::Duration;

use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::backoff::Backoff;
use super::envelope;
use super::error::ClientError;
use super::wire::{HostRegistration, InitRequest, InitResponse, Stats};
use crate::secret::Secret;

/// Per-request timeout (PROTOCOL.md §1).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of one registration call before its caller decides what next.
const CALL_TRIES: u32 = 4;

/// Which credential a call carries (**compat** header names).
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    /// `X-API-Key`: `/ping` and `/init`.
    ApiKey,
    /// `X-Agent-Secret`: every call after `/init`.
    Secret(&'a Secret),
}

/// The control-plane client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Secret,
    backoff: Backoff,
}

impl Client {
    /// `base` is `QUDATA_SERVICE_URL`; a trailing `/` is tolerated.
    pub fn new(base: &str, api_key: Secret, timeout: Duration) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect would carry X-API-Key / X-Agent-Secret to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("qudata-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Build { detail: chain(&e) })?;
        let base = base.trim_end_matches('/').to_owned();
        Ok(Client { http, base, api_key, backoff: Backoff::CALL })
    }

    /// Replaces the pause between tries (tests shorten it).
    pub fn with_backoff(mut self, backoff: Backoff) -> Client {
        self.backoff = backoff;
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET /ping`, one try: the start-up loop decides how long to go on.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Method::GET, "/ping", Auth::ApiKey, None, 1).await.map(drop)
    }

    /// `POST /init`, with retries.
    pub async fn init(&self, req: &InitRequest) -> Result<InitResponse, ClientError> {
        let data = self.call(Method::POST, "/init", Auth::ApiKey, Some(body(req)), CALL_TRIES);
        decode("/init", data.await?)
    }

    /// `POST /init/host`, with retries.
    pub async fn init_host(
        &self,
        secret: &Secret,
        host: &HostRegistration,
    ) -> Result<(), ClientError> {
        let auth = Auth::Secret(secret);
        self.call(Method::POST, "/init/host", auth, Some(body(host)), CALL_TRIES).await.map(drop)
    }

    /// `POST /stats`, one try: the reporter keeps failed samples and goes on at its cadence.
    pub async fn stats(&self, secret: &Secret, stats: &Stats) -> Result<(), ClientError> {
        let auth = Auth::Secret(secret);
        self.call(Method::POST, "/stats", auth, Some(body(stats)), 1).await.map(drop)
    }

    async fn call(
        &self,
        method: Method,
        path: &'static str,
        auth: Auth<'_>,
        body: Option<Vec<u8>>,
        tries: u32,
    ) -> Result<Value, ClientError> {
        let mut attempt = 0;
        loop {
            let result = self.once(method.clone(), path, auth, body.clone()).await;
            match result {
                Err(e) if e.is_transient() && attempt + 1 < tries => {
                    let pause = self.backoff.delay(attempt);
                    tracing::debug!(path, attempt, error = %e, ?pause, "control-plane call failed; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn once(
        &self,
        method: Method,
        path: &'static str,
        auth: Auth<'_>,
        body: Option<Vec<u8>>,
    ) -> Result<Value, ClientError> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        req = match auth {
            Auth::ApiKey => req.header("X-API-Key", self.api_key.expose()),
            Auth::Secret(s) => req.header("X-Agent-Secret", s.expose()),
        };
        if let Some(body) = body {
            req = req.body(body);
        }
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            path,
            detail: chain(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        envelope::open(path, status, &bytes)
    }
}

fn body(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("wire types always serialise")
}

fn decode<T: DeserializeOwned + Default>(
    path: &'static str,
    data: Value,
) -> Result<T, ClientError> {
    if data.is_null() {
        return Ok(T::default());
    }
    // serde's text can quote the offending value, which may be the secret: keep only its kind.
    serde_json::from_value(data).map_err(|e| ClientError::Malformed {
        path,
        detail: format!("`data` does not have the expected shape ({:?} error)", e.classify()),
    })
}

/// An error and its causes on one line (reqwest's top-level text omits the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
