//! Taking over the identity of the Go agent (v0.0.x) this agent replaces, so the control plane
//! sees the same host. The Go agent v0.0.9a kept its state in the same data dir
//! (`/var/lib/qudata`, `QUDATA_DATA_DIR` in both), as plain-text files written 0600:
//! `agent_id` (a UUID v4) and `agent_secret` (the `sk-…` secret from `/init`). Its FRP server
//! address, port and token were compiled in and rendered into frpc's config
//! (`/etc/qudata/frpc.toml`, `QUDATA_FRPC_CONFIG` in both: `serverAddr`, `serverPort`,
//! `[auth] token`); it stored no subdomain (its `tunnel_token` came from every `/init`).
//!
//! The import runs once, before this agent's identity exists: it writes this agent's files
//! (same agent id and secret; the FRP server as the Go agent's frpc config had it), then a
//! record of what it took. The Go agent's files are left as they were (a rollback to it keeps
//! working); the record stops a second import, so removing `identity.json` still means "register
//! as a new agent".

use std::path::Path;

use serde::Serialize;
use uuid::Uuid;

use super::{FRP_FILE, FrpCredentials, IDENTITY_FILE, IdentityError, IdentityFile, SECRET_FILE};
use crate::fsutil;
use crate::secret::Secret;

/// The Go agent's files in the shared data dir.
const GO_AGENT_ID: &str = "agent_id";
const GO_SECRET: &str = "agent_secret";
/// What the import took, written last; its presence means "done, never again".
pub const IMPORT_RECORD: &str = "go-agent-import.json";

/// What was taken over (no secret value in it: it is logged).
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct GoImport {
    pub agent_id: Uuid,
    /// The Go agent's secret became this agent's.
    pub secret: bool,
    /// FRP server address, port and token came from the Go agent's frpc config.
    pub frp_server: bool,
}

/// Takes over the Go agent's identity when `data_dir` holds one and this agent has none yet
/// and never imported one. `port` is `QUDATA_AGENT_PORT`; `frpc_config` is where the Go agent
/// wrote frpc's config. `Ok(None)`: nothing to take over.
pub fn import(
    data_dir: &Path,
    frpc_config: &Path,
    port: Option<u16>,
) -> Result<Option<GoImport>, IdentityError> {
    let record = data_dir.join(IMPORT_RECORD);
    if data_dir.join(IDENTITY_FILE).exists() || record.exists() {
        return Ok(None);
    }
    let id_path = data_dir.join(GO_AGENT_ID);
    let Some(text) = read_text(&id_path)? else { return Ok(None) };
    let agent_id = Uuid::parse_str(&text).map_err(|_| IdentityError::Damaged {
        path: id_path.clone(),
        detail: "the Go agent's agent id is not a UUID".into(),
    })?;

    let secret_path = data_dir.join(SECRET_FILE);
    let mut secret = false;
    if !secret_path.exists()
        && let Some(value) = read_text(&data_dir.join(GO_SECRET))?
    {
        fsutil::write_atomic(&secret_path, value.as_bytes())?;
        secret = true;
    }

    let frp_path = data_dir.join(FRP_FILE);
    let mut frp_server = false;
    if !frp_path.exists()
        && let Some(frp) = frp_server_of(frpc_config)?
    {
        let bytes = serde_json::to_vec_pretty(&frp).expect("json");
        fsutil::write_atomic(&frp_path, &bytes)?;
        frp_server = true;
    }

    let agent_port = match port {
        Some(p) => p,
        None => super::pick_free_port()?,
    };
    let file = IdentityFile { agent_id, agent_port };
    fsutil::write_atomic(
        &data_dir.join(IDENTITY_FILE),
        &serde_json::to_vec_pretty(&file).expect("json"),
    )?;

    let done = GoImport { agent_id, secret, frp_server };
    #[derive(Serialize)]
    struct Record<'a> {
        #[serde(flatten)]
        done: &'a GoImport,
        from: [String; 3],
    }
    let from = [
        id_path.display().to_string(),
        data_dir.join(GO_SECRET).display().to_string(),
        frpc_config.display().to_string(),
    ];
    let bytes = serde_json::to_vec_pretty(&Record { done: &done, from }).expect("json");
    fsutil::write_atomic(&record, &bytes)?;
    Ok(Some(done))
}

/// A file's trimmed text; `None` when it is missing or blank.
fn read_text(path: &Path) -> Result<Option<String>, IdentityError> {
    Ok(fsutil::read_optional(path)?
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .filter(|s| !s.is_empty()))
}

/// `serverAddr`, `serverPort` and `[auth] token` from the Go agent's frpc config, when all
/// three are there. A config that is missing or not TOML gives `None`: it held no credential
/// this agent could use, and `/init` or the environment may still give them.
fn frp_server_of(frpc_config: &Path) -> Result<Option<FrpCredentials>, IdentityError> {
    let Some(bytes) = fsutil::read_optional(frpc_config)? else { return Ok(None) };
    let Ok(table) = String::from_utf8_lossy(&bytes).parse::<toml::Table>() else {
        tracing::warn!(path = %frpc_config.display(), "the Go agent's frpc config is not TOML; its FRP server is not taken over");
        return Ok(None);
    };
    let addr = table.get("serverAddr").and_then(|v| v.as_str()).filter(|s| !s.trim().is_empty());
    let port = table
        .get("serverPort")
        .and_then(|v| v.as_integer())
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let token = table
        .get("auth")
        .and_then(|a| a.get("token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty());
    Ok(match (addr, port, token) {
        (Some(addr), Some(port), Some(token)) => Some(FrpCredentials {
            server_addr: Some(addr.to_owned()),
            server_port: Some(port),
            token: Some(Secret::new(token)),
            subdomain: None,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
