//! FRP tunnels (PROTOCOL.md §3): frpc's files, its admin API, its supervision, and `Tunnels`,
//! the façade the agent and the instance manager call:
//!
//! - start-up, after `/init`: `Tunnels::start(TunnelSettings::new(..), credentials_from_parts(..))`
//!   (adopts the frpc a previous agent left running, or starts one; none without credentials);
//! - a later `/init` with other credentials: `set_credentials` (restarts frpc only if the main
//!   file changed);
//! - create: `validate_instance` (a refusal is a 400); once host ports exist: `publish`, whose
//!   report carries a per-port error for a port the FRP server refused;
//! - recovery: `publish` for each adopted instance, `unpublish` for each id of
//!   `published_ids` that has no record; delete: `unpublish`;
//! - the instance manager reaches all of this through `TunnelPublisher`;
//! - status: `proxy_errors`; uninstall only: `teardown` (dropping `Tunnels` keeps frpc running).

pub mod admin;
pub mod config;
mod credentials;
mod logs;
mod mainfile;
pub mod process;
mod publish;
mod publisher;
pub mod supervisor;
pub mod validate;
mod wait;

use std::path::PathBuf;

pub use admin::{AdminClient, AdminError, ProxyStatus};
pub use config::{FrpCredentials, InstanceTunnels, TunnelPort, TunnelProto};
pub use credentials::{MissingCredentials, credentials_from_parts, resolve_credentials};
pub use publish::{PortOutcome, PublishReport, TunnelSettings, Tunnels};
pub use publisher::{TunnelPublisher, instance_tunnels};
pub use supervisor::{Backoff, Started, Supervisor, SupervisorOptions};
pub use validate::validate_instance;

/// Everything that can go wrong with tunnels.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("invalid {what} {value:?} for an FRP tunnel: {hint}")]
    Invalid { what: String, value: String, hint: &'static str },
    #[error(transparent)]
    Files(#[from] crate::fsutil::FsError),
    #[error("cannot read back {path}: {detail}; delete it so the agent writes a new one")]
    BadConfigFile { path: PathBuf, detail: String },
    #[error("cannot render the frpc config: {0}")]
    Render(#[from] toml::ser::Error),
    #[error("cannot start {binary}: {source}; install frpc or set QUDATA_FRPC_BINARY")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(
        "frpc did not answer on its admin API within {seconds} s; see the frpc lines in the log"
    )]
    NotReady { seconds: u64 },
}
