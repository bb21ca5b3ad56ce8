//! Start-up and shutdown order; wires the parts together.
//!
//! Order: directories → identity → instance records reattached (before serving) → API listens
//! → systemd told we are ready → (production) frpc with the stored FRP credentials, beside
//! registration with the control plane; frpc updated with `/init`'s; then the stats loop.
//! A `SIGTERM` stops the agent and leaves every instance and frpc running.

pub mod backends;
pub mod limits;
pub mod logging;
mod production;
mod tunnels;

pub use production::run;

use std::path::PathBuf;

use tokio::sync::{mpsc, watch};

use crate::api::{self, SecretSlot};
use crate::config::Config;
use crate::fsutil::{self, FsError};
use crate::instance::manager::{Manager, ManagerError, ManagerSettings};
use crate::instance::store::{Store, StoreError};
use crate::ports;
use crate::secret::Secret;

/// Start-up failed; each variant is one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot reattach instances: {0}")]
    Restore(#[from] ManagerError),
    #[error("cannot open the instance records: {0}")]
    Store(#[from] StoreError),
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot set up the control-plane client: {0}")]
    ControlPlane(#[from] crate::control_plane::ClientError),
    #[error("cannot load the agent identity: {0}")]
    Identity(#[from] crate::control_plane::IdentityError),
    #[error("QUDATA_API_KEY is not set; set it to the key issued by Qudata, or use `run --local`")]
    NoApiKey,
}

/// Local mode's port when `QUDATA_AGENT_PORT` is unset.
pub const LOCAL_DEFAULT_PORT: u16 = 8734;

async fn manager(
    cfg: &Config,
    local: bool,
) -> Result<(Manager, mpsc::UnboundedReceiver<crate::backend::BackendEvent>), AgentError> {
    let store = Store::open(&cfg.data_dir)?;
    let gpu_pool = cfg.gpu_pci_addrs.clone().unwrap_or_default();
    let settings = ManagerSettings {
        limits: limits::probe(&cfg.data_dir),
        gpu_pool: gpu_pool.clone(),
        host_ports: ports::HOST_PORTS,
        local,
    };
    let (sink, events) = mpsc::unbounded_channel();
    // The backend is chosen for the GPUs the manager hands out.
    let backend = backends::build(cfg, &gpu_pool, sink).await;
    if let Err(reason) = &backend {
        tracing::warn!(%reason, "no backend: instances cannot be created");
    }
    Ok((Manager::new(backend, store, settings), events))
}

/// The local secret: made once, stored 0600, printed only when made.
fn local_secret(cfg: &Config) -> Result<(Secret, bool), AgentError> {
    let path: PathBuf = cfg.data_dir.join("local-secret");
    if let Some(bytes) = fsutil::read_optional(&path)? {
        let text = String::from_utf8_lossy(&bytes).trim().to_owned();
        if !text.is_empty() {
            return Ok((Secret::new(text), false));
        }
    }
    let secret = Secret::new(format!("sk-local-{}", uuid::Uuid::new_v4().simple()));
    fsutil::write_atomic(&path, secret.expose().as_bytes())?;
    Ok((secret, true))
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down, instances keep running"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down, instances keep running"),
    }
}

/// `qudata-agent run --local`: no control plane, no frpc, a generated secret.
pub async fn run_local(cfg: Config) -> Result<(), AgentError> {
    fsutil::ensure_private_dir(&cfg.data_dir)?;
    fsutil::ensure_private_dir(&cfg.run_dir)?;
    let (secret, fresh) = local_secret(&cfg)?;
    let (manager, events) = manager(&cfg, true).await?;
    manager.spawn_event_loop(events);
    manager.restore().await?;

    let port = cfg.agent_port.unwrap_or(LOCAL_DEFAULT_PORT);
    let listener = api::bind(port).await.map_err(|source| AgentError::Listen { port, source })?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    let app = api::router(manager.clone(), SecretSlot::new(Some(secret.clone())));
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(api::serve(listener, app, stopped));
    notify_ready();
    print_local_banner(&cfg, port, fresh.then_some(&secret));
    tracing::info!(port, "agent API listening on 127.0.0.1 (local mode)");

    termination().await;
    stop.send_replace(true);
    server.await.expect("server task").map_err(AgentError::Serve)
}

fn print_local_banner(cfg: &Config, port: u16, new_secret: Option<&Secret>) {
    let file = cfg.data_dir.join("local-secret");
    if let Some(secret) = new_secret {
        // Printed once, to the terminal only, never to the log.
        println!("New local agent secret (stored in {}): {}", file.display(), secret.expose());
    }
    println!(
        "qudata-agent (local mode) listens on http://127.0.0.1:{port}\n\
         Try (P is the port shown for \"22\" once the status is \"running\"):\n  \
         S=$(cat {file})\n  \
         curl -s -H \"X-Agent-Secret: $S\" -d '{{\"ssh_enabled\":true}}' http://127.0.0.1:{port}/instances\n  \
         curl -s -H \"X-Agent-Secret: $S\" http://127.0.0.1:{port}/instances\n  \
         curl -s -H \"X-Agent-Secret: $S\" -d \"{{\\\"ssh_pubkey\\\":\\\"$(cat ~/.ssh/id_ed25519.pub)\\\"}}\" http://127.0.0.1:{port}/ssh\n  \
         ssh -p P root@127.0.0.1\n  \
         curl -s -H \"X-Agent-Secret: $S\" -X DELETE http://127.0.0.1:{port}/instances",
        file = file.display()
    );
}

/// Tells systemd (`Type=notify`) that the API listens; a no-op outside systemd.
fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
