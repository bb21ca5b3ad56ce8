//! Client of frpc's admin API (`client/http/controller.go` in frp ≥ 0.52): `GET /api/reload`
//! and `GET /api/status`, basic auth, on 127.0.0.1 only.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::config::WebServerConfig;
use crate::secret::Secret;

/// One proxy as `/api/status` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ProxyStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// frp's phase: "new", "wait start", "start error", "running", "check failed", "closed".
    pub status: String,
    #[serde(default)]
    pub err: String,
    #[serde(default)]
    pub local_addr: String,
    #[serde(default)]
    pub remote_addr: String,
}

/// `/api/status`: proxies grouped by type (`{"tcp":[…],"http":[…]}`).
pub type StatusResponse = BTreeMap<String, Vec<ProxyStatus>>;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("frpc admin API at {url} is unreachable ({source}); check that frpc is running")]
    Unreachable { url: String, source: reqwest::Error },
    #[error(
        "frpc admin API at {url} refused the credentials; the webServer user/password in the \
         frpc config do not match the running frpc, restart it"
    )]
    Unauthorized { url: String },
    #[error("frpc admin API {url} answered {status}: {body}")]
    Refused { url: String, status: u16, body: String },
    #[error("frpc admin API {url} sent an unreadable answer: {detail}")]
    BadAnswer { url: String, detail: String },
}

/// Admin API client; each request has a short deadline (frpc is local).
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    user: String,
    password: Secret,
}

impl AdminClient {
    pub fn new(web: &WebServerConfig) -> AdminClient {
        let http = reqwest::Client::builder()
            // A proxy from the environment must never see the admin password.
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a reqwest client with static settings builds");
        AdminClient {
            http,
            base: format!("http://{}:{}", web.addr, web.port),
            user: web.user.clone(),
            password: web.password.clone(),
        }
    }

    async fn get(&self, path: &str) -> Result<(String, String), AdminError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .basic_auth(&self.user, Some(self.password.expose()))
            .send()
            .await
            .map_err(|source| AdminError::Unreachable { url: url.clone(), source })?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| AdminError::BadAnswer { url: url.clone(), detail: e.to_string() })?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(AdminError::Unauthorized { url });
        }
        if !status.is_success() {
            let body = body.trim().chars().take(500).collect();
            return Err(AdminError::Refused { url, status: status.as_u16(), body });
        }
        Ok((url, body))
    }

    /// Re-reads the includes; strict: an unknown key fails the reload instead of being ignored.
    pub async fn reload(&self) -> Result<(), AdminError> {
        self.get("/api/reload?strictConfig=true").await.map(drop)
    }

    /// Every proxy frpc knows, by name.
    pub async fn status(&self) -> Result<BTreeMap<String, ProxyStatus>, AdminError> {
        let (url, body) = self.get("/api/status").await?;
        let parsed: StatusResponse = serde_json::from_str(&body)
            .map_err(|e| AdminError::BadAnswer { url, detail: e.to_string() })?;
        Ok(parsed.into_values().flatten().map(|p| (p.name.clone(), p)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frps_status_shape() {
        // As frp v0.52+ sends it (map of type to sorted list).
        let body = r#"{"http":[{"name":"a-agent","type":"http","status":"running","err":"",
            "local_addr":"127.0.0.1:8080","plugin":"","remote_addr":"x"}],
            "tcp":[{"name":"a-i-22","type":"tcp","status":"start error",
            "err":"port already used","local_addr":"127.0.0.1:42022","plugin":"",
            "remote_addr":""}]}"#;
        let parsed: StatusResponse = serde_json::from_str(body).unwrap();
        assert_eq!(parsed["tcp"][0].err, "port already used");
        assert_eq!(parsed["http"][0].status, "running");
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, json};

    const KEYS: &[&str] = &["tcp", "http", "name", "type", "status", "err", "local_addr"];

    proptest! {
        #![proptest_config(config())]

        /// frpc's admin answers whatever it likes: it is read or refused, never a panic.
        #[test]
        fn frpc_status_answers(body in json(KEYS)) {
            if let Ok(parsed) = serde_json::from_value::<StatusResponse>(body) {
                let by_name: BTreeMap<String, ProxyStatus> =
                    parsed.into_values().flatten().map(|p| (p.name.clone(), p)).collect();
                let _ = by_name.len();
            }
        }
    }
}
