//! Who this agent is to the control plane, kept under the data dir (0600, atomic): the agent
//! id (made once), the agent port (chosen once, so the public name stays stable), the secret
//! and the FRP credentials `/init` gave.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::wire::InitResponse;
use crate::config::FrpOverrides;
use crate::fsutil::{self, FsError};
use crate::secret::Secret;

pub mod go_agent;

const IDENTITY_FILE: &str = "identity.json";
const SECRET_FILE: &str = "agent-secret";
const FRP_FILE: &str = "frp.json";
/// Where a fresh agent port is picked: below Linux's ephemeral range (32768+) so an outgoing
/// connection cannot hold it at the next start, and above the instances' default host ports
/// (`ports::HOST_PORTS`, 20000-22999). Identities made before that range moved there keep
/// their port; the host port allocator skips it (it is listened on).
const PORT_RANGE: std::ops::RangeInclusive<u16> = 23000..=29999;

/// An identity file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{path} is damaged ({detail}); restore it from a backup, or remove it to register as a new agent"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("no free local port for the agent API; set QUDATA_AGENT_PORT")]
    NoFreePort,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    agent_id: Uuid,
    agent_port: u16,
}

/// FRP server credentials: from `/init`, persisted, then overridden by the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrpCredentials {
    pub server_addr: Option<String>,
    pub server_port: Option<u16>,
    pub token: Option<Secret>,
    pub subdomain: Option<String>,
}

impl FrpCredentials {
    /// Each field set in `newer` (non-empty) replaces this one's.
    fn merged(&self, newer: &FrpCredentials) -> FrpCredentials {
        fn pick<T: Clone>(new: &Option<T>, old: &Option<T>) -> Option<T> {
            new.clone().or_else(|| old.clone())
        }
        FrpCredentials {
            server_addr: pick(&newer.server_addr, &self.server_addr),
            server_port: pick(&newer.server_port, &self.server_port),
            token: pick(&newer.token, &self.token),
            subdomain: pick(&newer.subdomain, &self.subdomain),
        }
    }

    /// What `/init` sent; `tunnel_token` stands in for a missing `frp.subdomain`.
    pub fn from_init(init: &InitResponse) -> FrpCredentials {
        let frp = init.frp.clone().unwrap_or_default();
        let text = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        FrpCredentials {
            server_addr: text(frp.server_addr),
            server_port: frp.server_port.filter(|p| *p != 0),
            token: frp.token.filter(|t| !t.is_empty()),
            subdomain: text(frp.subdomain).or_else(|| text(init.tunnel_token.clone())),
        }
    }

    /// The environment's settings win over `/init`'s.
    pub fn with_overrides(&self, env: &FrpOverrides) -> FrpCredentials {
        let env = FrpCredentials {
            server_addr: env.server.clone(),
            server_port: env.port,
            token: env.token.clone(),
            subdomain: env.subdomain.clone(),
        };
        self.merged(&env)
    }

    /// What the last `/init` left in `data_dir`; reads only, creates nothing (for `doctor`).
    pub fn load_stored(data_dir: &Path) -> Result<FrpCredentials, IdentityError> {
        Ok(read_json(&data_dir.join(FRP_FILE))?.unwrap_or_default())
    }

    /// Enough to start frpc.
    pub fn is_complete(&self) -> bool {
        self.server_addr.is_some() && self.server_port.is_some() && self.token.is_some()
    }
}

/// The persisted identity.
#[derive(Debug)]
pub struct Identity {
    dir: PathBuf,
    pub agent_id: Uuid,
    pub agent_port: u16,
    secret: Option<Secret>,
    frp: FrpCredentials,
}

impl Identity {
    /// Loads the identity from `data_dir`, making what is missing. `port` (`QUDATA_AGENT_PORT`)
    /// wins over the stored port and is stored in its place.
    pub fn load_or_create(data_dir: &Path, port: Option<u16>) -> Result<Identity, IdentityError> {
        let path = data_dir.join(IDENTITY_FILE);
        let stored: Option<IdentityFile> = read_json(&path)?;
        let agent_id = stored.as_ref().map(|s| s.agent_id).unwrap_or_else(Uuid::new_v4);
        let agent_port = match (port, &stored) {
            (Some(p), _) => p,
            (None, Some(s)) => s.agent_port,
            (None, None) => pick_free_port()?,
        };
        if stored.as_ref().is_none_or(|s| s.agent_port != agent_port) {
            let file = IdentityFile { agent_id, agent_port };
            fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&file).expect("json"))?;
        }
        let secret = fsutil::read_optional(&data_dir.join(SECRET_FILE))?
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        let frp = read_json(&data_dir.join(FRP_FILE))?.unwrap_or_default();
        Ok(Identity { dir: data_dir.to_owned(), agent_id, agent_port, secret, frp })
    }

    /// The agent secret, from `/init` now or from a previous run.
    pub fn secret(&self) -> Option<&Secret> {
        self.secret.as_ref()
    }

    /// FRP credentials as stored (without the environment's overrides).
    pub fn frp(&self) -> &FrpCredentials {
        &self.frp
    }

    /// Keeps what `/init` answered: a non-empty secret replaces the stored one (an empty one
    /// keeps it); FRP fields sent replace the stored ones. Files are written only on change.
    pub fn apply_init(&mut self, init: &InitResponse) -> Result<(), IdentityError> {
        if let Some(secret) = init.secret_key.clone().filter(|s| !s.is_empty())
            && self.secret.as_ref() != Some(&secret)
        {
            fsutil::write_atomic(&self.dir.join(SECRET_FILE), secret.expose().as_bytes())?;
            self.secret = Some(secret);
        }
        let frp = self.frp.merged(&FrpCredentials::from_init(init));
        if frp != self.frp {
            let bytes = serde_json::to_vec_pretty(&frp).expect("json");
            fsutil::write_atomic(&self.dir.join(FRP_FILE), &bytes)?;
            self.frp = frp;
        }
        Ok(())
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, IdentityError> {
    let Some(bytes) = fsutil::read_optional(path)? else { return Ok(None) };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| IdentityError::Damaged {
        path: path.to_owned(),
        detail: format!("{:?} error at line {}", e.classify(), e.line()),
    })
}

/// A port in `PORT_RANGE` that nothing listens on now.
fn pick_free_port() -> Result<u16, IdentityError> {
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(PORT_RANGE);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(IdentityError::NoFreePort)
}

#[cfg(test)]
mod tests;
