//! Start-up and shutdown order; wires the parts together.
//!
//! Order: run lock → directories → identity → start-up recovery (`crate::recovery`: records
//! reattached, orphans reaped, leaked files removed, stale GPU binds undone; before serving)
//! → API listens
//! → systemd told we are ready → (production) frpc with the stored FRP credentials, beside
//! registration with the control plane; frpc updated with `/init`'s; then the stats loop.
//! A `SIGTERM` stops the agent and leaves every instance and frpc running; deletions already
//! accepted are finished first (their VMs or containers stopped at once), so a lease that
//! ended does not outlive the agent.

pub mod backends;
pub mod limits;
pub mod logging;
pub mod notify;
mod production;
mod tunnels;

pub use production::run;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::api::{self, SecretSlot};
use crate::backend::{BackendEvent, HostSweeper};
use crate::config::{BackendChoice, Config};
use crate::fsutil::{self, FsError};
use crate::gpu::GpuTelemetry;
use crate::instance::manager::{Manager, ManagerSettings, Unavailable};
use crate::instance::store::{Store, StoreError};
use crate::recovery::lock::{LockError, RunLock};
use crate::recovery::{self, RecoveryError};
use crate::secret::Secret;

/// Start-up failed; each variant is one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot start: {0}")]
    Lock(#[from] LockError),
    #[error("start-up recovery failed: {0}")]
    Recovery(#[from] RecoveryError),
    #[error("cannot open the instance records: {0}")]
    Store(#[from] StoreError),
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot set up the control-plane client: {0}")]
    ControlPlane(#[from] crate::control_plane::ClientError),
    #[error("cannot load the agent identity: {0}")]
    Identity(#[from] crate::control_plane::IdentityError),
    /// `QUDATA_BACKEND=auto` found neither a VM nor a Docker backend that can run here.
    #[error("no backend can run on this host: {0}")]
    NoBackend(#[source] Arc<backends::NoBackend>),
    #[error("QUDATA_API_KEY is not set; set it to the key issued by Qudata, or use `run --local`")]
    NoApiKey,
    /// A setting that only the host can check (a listed GPU that is not there).
    #[error(transparent)]
    Setting(#[from] crate::config::ConfigError),
}

/// Local mode's port when `QUDATA_AGENT_PORT` is unset.
pub const LOCAL_DEFAULT_PORT: u16 = 8734;

/// The instance manager, and the backend recovery cleans up with (the manager's, or one good
/// only for cleaning up when no backend can run here).
pub(crate) struct Built {
    manager: Manager,
    events: mpsc::UnboundedReceiver<BackendEvent>,
    /// What recovery finds and cleans up with: the manager's backend and the other kinds.
    cleanup: Vec<Arc<dyn HostSweeper>>,
    /// The guests' bridges, shared by the backends and recovery.
    network: Arc<crate::network::HostNetwork>,
    /// The offered GPUs' health, shared with the manager and the reports.
    gpu_health: Arc<crate::gpu::health::HealthView>,
}

/// Host ports in the kernel's ephemeral range can be taken by any outgoing connection while an
/// instance is stopped; the agent runs anyway (the operator chose the range) and says so.
fn warn_if_the_kernel_may_take(host_ports: &std::ops::RangeInclusive<u16>) {
    use crate::ports::ephemeral::{self, Verdict};
    match ephemeral::judge(std::path::Path::new("/proc"), host_ports) {
        Ok(Verdict::Clear { .. }) => {}
        Ok(Verdict::Exposed { problem, fix }) => {
            tracing::warn!(%problem, %fix, "host ports can be taken by the kernel")
        }
        Err(e) => tracing::warn!(reason = %e, "cannot check the host ports against the kernel"),
    }
}

/// `gpu`: where the VM backend's in-guest GPU metrics go and the host's NVML (`None` in local
/// mode).
async fn manager(
    cfg: &Config,
    local: bool,
    gpu: Option<GpuTelemetry>,
) -> Result<Built, AgentError> {
    let store = Store::open(&cfg.data_dir)?;
    // QUDATA_GPU_PCI_ADDRS checked against sysfs, or every NVIDIA GPU found.
    let gpu_pool: Vec<String> = crate::gpu::pool::offered(
        &crate::vfio::SysfsRoot::new(&cfg.sysfs_root),
        cfg.gpu_pci_addrs.as_deref(),
    )?
    .iter()
    .map(ToString::to_string)
    .collect();
    let vfio = Arc::new(backends::vfio(cfg));
    let offered = gpu_pool.iter().filter_map(|a| a.parse().ok()).collect();
    let nvml = gpu.as_ref().map(|g| g.host_nvml.clone());
    let gpu_health = Arc::new(crate::gpu::health::HealthView::new(vfio, offered, nvml));
    warn_if_the_kernel_may_take(&cfg.host_ports);
    let settings = ManagerSettings {
        gpu_health: Some(gpu_health.clone()),
        limits: limits::probe(
            &cfg.data_dir,
            limits::Wanted { cpus: cfg.instance_cpus, memory_mib: cfg.instance_memory_mib },
            local,
        ),
        gpu_pool: gpu_pool.clone(),
        host_ports: cfg.host_ports.clone(),
        local,
    };
    let (sink, events) = mpsc::unbounded_channel();
    // The backend is chosen for the GPUs the manager hands out.
    let network = backends::network(cfg);
    let backend =
        backends::build(cfg, &gpu_pool, sink.clone(), gpu, &network).await.map_err(Arc::new);
    // `auto` with nothing usable is a host that is not provisioned: stop with the reason
    // (systemd starts the agent again, so it runs once the image or the engine is there). An
    // explicit choice keeps serving and reporting instead, every create answered 503 with the
    // reason, until a restart finds its backend.
    match &backend {
        Err(reason) if cfg.backend == BackendChoice::Auto => {
            return Err(AgentError::NoBackend(reason.clone()));
        }
        Err(reason) => tracing::warn!(%reason, "no backend: instances cannot be created"),
        Ok(_) => {}
    }
    // The running backend's own sweeper first (it knows its NVML), then the other kinds'.
    let mut cleanup: Vec<Arc<dyn HostSweeper>> =
        backend.iter().map(|chosen| chosen.sweeper.clone()).collect();
    for other in backends::sweepers(cfg, sink, &network).await {
        if !cleanup.iter().any(|b| b.kind() == other.kind()) {
            cleanup.push(other);
        }
    }
    let backend = backend.map(|chosen| chosen.lifecycle).map_err(|e| e as Unavailable);
    let manager = Manager::new(backend, store, settings);
    manager.set_sweepers(cleanup.clone());
    Ok(Built { manager, events, cleanup, network, gpu_health })
}

/// Before anything else: the run lock (held for the agent's life, so a `recover` waits), then
/// the manager, then the start-up reconciliation (PROTOCOL.md §4). Returns the ids restored.
async fn start_up(
    cfg: &Config,
    local: bool,
    gpu: Option<GpuTelemetry>,
) -> Result<(RunLock, Built, Vec<String>), AgentError> {
    let lock = RunLock::acquire(&cfg.run_dir, "run", recovery::AGENT_LOCK_WAIT).await?;
    let built = manager(cfg, local, gpu).await?;
    let manager = built.manager.clone();
    let restored = recovery::at_startup(&manager, &built.cleanup, &built.network, cfg).await?;
    tokio::spawn(built.network.clone().watch());
    // Stale binds are back by now: quarantined GPUs get another reset, then the watch starts.
    let health = built.gpu_health.clone();
    let kmsg = cfg.kmsg_path.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let cleared = crate::vfio::quarantine::Cleared::now(&health.vfio.proc_root);
        if let Err(e) = health.vfio.retry_quarantined(&cleared) {
            tracing::error!(error = %e, "cannot retry the quarantined GPUs");
        }
        health.watch(kmsg);
    })
    .await;
    Ok((lock, built, restored))
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

/// How long the agent, asked to exit, spends finishing the deletions it accepted (the unit's
/// `TimeoutStopSec` is 30 s).
const DELETIONS_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Resolves on SIGTERM or SIGINT, having told systemd that the shutdown has begun.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down; instances keep running, deletions in progress are finished first"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down; instances keep running, deletions in progress are finished first"),
    }
    notify::stopping();
}

/// `qudata-agent run --local`: no control plane, no frpc, a generated secret.
pub async fn run_local(cfg: Config) -> Result<(), AgentError> {
    fsutil::ensure_state_dir(&cfg.data_dir)?;
    fsutil::ensure_state_dir(&cfg.run_dir)?;
    let (secret, fresh) = local_secret(&cfg)?;
    // Local mode reports no stats, so it runs no in-guest GPU metrics.
    let (_lock, Built { manager, events, .. }, _) = start_up(&cfg, true, None).await?;
    manager.spawn_event_loop(events);

    let port = cfg.agent_port.unwrap_or(LOCAL_DEFAULT_PORT);
    let listener = api::bind(port).await.map_err(|source| AgentError::Listen { port, source })?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    let app = api::router(manager.clone(), SecretSlot::new(Some(secret.clone())));
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(api::serve(listener, app, stopped));
    notify::ready(port);
    print_local_banner(&cfg, port, fresh.then_some(&secret));
    tracing::info!(port, "agent API listening on 127.0.0.1 (local mode)");

    termination().await;
    stop.send_replace(true);
    let served = server.await.expect("server task").map_err(AgentError::Serve);
    manager.finish_deletions(DELETIONS_AT_EXIT).await;
    served
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
