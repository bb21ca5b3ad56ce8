//! Waiting on frpc's admin API, always with a deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::TunnelError;
use super::admin::{AdminClient, ProxyStatus};

const POLL: Duration = Duration::from_millis(100);

/// Waits until the admin API answers (frpc just started or restarted).
pub async fn admin_up(admin: &AdminClient, timeout: Duration) -> Result<(), TunnelError> {
    let deadline = Instant::now() + timeout;
    loop {
        match admin.status().await {
            Ok(_) => return Ok(()),
            // Wrong credentials will not get better by waiting.
            Err(e @ super::AdminError::Unauthorized { .. }) => return Err(e.into()),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            Err(_) => return Err(TunnelError::NotReady { seconds: timeout.as_secs() }),
        }
    }
}

/// None: running. Some: the error frpc reports, or its phase when it has no error text.
pub fn proxy_error(status: Option<&ProxyStatus>) -> Option<String> {
    match status {
        None => Some("frpc does not know this proxy".to_owned()),
        Some(p) if p.status == "running" => None,
        Some(p) if !p.err.is_empty() => Some(p.err.clone()),
        Some(p) => Some(format!("proxy is {}", p.status)),
    }
}

/// A phase from which frpc will not get to `running` by itself soon.
fn failed(p: &ProxyStatus) -> bool {
    !p.err.is_empty() || matches!(p.status.as_str(), "start error" | "check failed" | "closed")
}

/// Polls `/api/status` until each named proxy is `running` or failed, or the deadline passes.
pub async fn running(
    admin: &AdminClient,
    names: &[String],
    timeout: Duration,
) -> BTreeMap<String, Result<(), String>> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("frpc's admin API did not answer");
    loop {
        match admin.status().await {
            Ok(status) => {
                let settled = names
                    .iter()
                    .all(|n| status.get(n).is_some_and(|p| p.status == "running" || failed(p)));
                if settled || Instant::now() >= deadline {
                    return names
                        .iter()
                        .map(|n| (n.clone(), proxy_error(status.get(n)).map_or(Ok(()), Err)))
                        .collect();
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() >= deadline {
            return names.iter().map(|n| (n.clone(), Err(last_error.clone()))).collect();
        }
        tokio::time::sleep(POLL).await;
    }
}
