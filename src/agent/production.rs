//! `qudata-agent run`: production mode. The API serves first (with the stored secret, or
//! closed with 503 until registration gives one); registration and the stats loop run in the
//! background, so a control plane that is down never stops the agent or its instances.

use std::sync::Arc;

use tokio::sync::watch;

use super::tunnels::TunnelLink;
use super::{AgentError, Built, notify, start_up, termination};
use crate::api::{self, SecretSlot};
use crate::backend::HostSweeper;
use crate::config::Config;
use crate::control_plane::identity::go_agent;
use crate::control_plane::wire::InitRequest;
use crate::control_plane::{
    self, AgentStats, Client, HostProbe, Identity, REQUEST_TIMEOUT, Reporter,
};
use crate::fsutil;
use crate::gpu::{self, GpuMetrics, GpuTelemetry, HostNvml, facts::FactsInputs};
use crate::guest::metrics::{GpuStreams, GuestGpuBoard};
use crate::host::{self, Sampler};
use crate::instance::{BackendKind, Manager};
use crate::recovery;
use crate::vfio::SysfsRoot;

pub async fn run(cfg: Config) -> Result<(), AgentError> {
    fsutil::ensure_state_dir(&cfg.data_dir)?;
    fsutil::ensure_state_dir(&cfg.run_dir)?;
    let api_key = cfg.api_key.clone().ok_or(AgentError::NoApiKey)?;
    // Before anything writes frpc's config: the Go agent's is read for its FRP server.
    if let Some(done) = go_agent::import(&cfg.data_dir, &cfg.frpc_config, cfg.agent_port)? {
        tracing::info!(
            agent_id = %done.agent_id,
            secret = done.secret,
            frp_server = done.frp_server,
            "took over the Go agent's identity (its files are left as they were)"
        );
    }
    let identity = Identity::load_or_create(&cfg.data_dir, cfg.agent_port)?;
    let client = Client::new(&cfg.service_url, api_key, REQUEST_TIMEOUT)?;
    let gpu = GpuTelemetry {
        streams: Arc::new(GpuStreams::new(GuestGpuBoard::default())),
        host_nvml: Arc::new(HostNvml::new(cfg.nvml_library.clone())),
        interval: cfg.stats_interval,
    };
    let (_lock, built, restored) = start_up(&cfg, false, Some(gpu.clone())).await?;
    let Built { manager, events, cleanup, .. } = built;
    manager.spawn_event_loop(events);

    let port = identity.agent_port;
    let listener = api::bind(port).await.map_err(|source| AgentError::Listen { port, source })?;
    // A secret from a previous run opens the API at once; else it stays closed (503).
    let slot = SecretSlot::new(identity.secret().cloned());
    let app = api::router(manager.clone(), slot.clone());
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(api::serve(listener, app, stopped.clone()));
    notify::ready(port);
    tracing::info!(port, agent_id = %identity.agent_id, "agent API listening on 127.0.0.1");

    let request = init_request(&cfg, &identity, &manager);
    let background = ControlPlane {
        cfg,
        client,
        identity,
        request,
        slot,
        manager: manager.clone(),
        cleanup,
        restored,
        gpu,
    };
    let control = tokio::spawn(background.run(stopped));

    termination().await;
    stop.send_replace(true);
    control.abort();
    let served = server.await.expect("server task").map_err(AgentError::Serve);
    manager.finish_deletions(super::DELETIONS_AT_EXIT).await;
    served
}

/// Registration, then telemetry; lives as long as the agent.
struct ControlPlane {
    cfg: Config,
    client: Client,
    identity: Identity,
    request: InitRequest,
    slot: SecretSlot,
    manager: Manager,
    /// The backend recovery uses, and the instances restored at start-up: the lease from
    /// `/init` applies to those.
    cleanup: Vec<Arc<dyn HostSweeper>>,
    restored: Vec<String>,
    /// In-guest GPU values and the host's NVML.
    gpu: GpuTelemetry,
}

/// How long registration waits for NVML to load (dlopen and nvmlInit).
const NVML_RELOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl ControlPlane {
    async fn run(mut self, stop: watch::Receiver<bool>) {
        let roots = host::Roots { sys: self.cfg.sysfs_root.clone(), ..Default::default() };
        // After start-up's reconcile, so GPUs it returned to the driver are seen.
        // nvmlInit may hang on a sick driver: registration does not wait for it forever.
        let host_nvml = self.gpu.host_nvml.clone();
        let reload = tokio::task::spawn_blocking(move || host_nvml.reload());
        if tokio::time::timeout(NVML_RELOAD_DEADLINE, reload).await.is_err() {
            tracing::warn!(
                seconds = NVML_RELOAD_DEADLINE.as_secs(),
                "NVML did not load in time; registering without the driver's GPU facts"
            );
        }
        let gpu = match self.gpu.host_nvml.with(|nvml| self.gpu_facts(Some(nvml))) {
            Some(facts) => facts,
            None => self.gpu_facts(None),
        };
        let gpu_health = self.manager.gpu_health_report();
        let probe = HostProbe { roots: &roots, data_dir: &self.cfg.data_dir, gpu, gpu_health };
        // frpc first with what is stored (adopting a running one), beside registration, so the
        // tunnels stay supervised and published while the control plane is down.
        let agent_id = self.identity.agent_id.to_string();
        let mut link =
            TunnelLink::new(&self.cfg, &agent_id, self.identity.agent_port, self.manager.clone());
        let stored = self.identity.frp().clone();
        let early = tokio::spawn(async move {
            link.apply(&stored, false).await;
            link
        });
        let slot = self.slot.clone();
        let on_secret = move |s: &crate::secret::Secret| slot.set(Some(s.clone()));
        let registered = control_plane::register(
            &self.client,
            &mut self.identity,
            &self.request,
            &probe,
            &on_secret,
        )
        .await;
        if let Some(running) = registered.instance_running {
            tracing::info!(instance_running = running, "control plane's view of the lease");
            let backend = &self.cleanup;
            let lease =
                recovery::apply_lease(&self.manager, backend, &self.cfg, &self.restored, running);
            if let Err(e) = lease.await {
                tracing::error!(error = %e, "cannot apply the lease to the restored instances");
            }
        }
        // Then what `/init` sent: frpc restarts only if its main file changes.
        let mut link = early.await.expect("tunnel start-up task");
        link.apply(self.identity.frp(), true).await;
        let reporter = Reporter {
            client: self.client,
            secret: registered.secret,
            source: Arc::new(AgentStats {
                manager: self.manager,
                gpus: Arc::new(GpuMetrics::new(
                    Some(self.gpu.host_nvml.clone()),
                    self.gpu.streams.board().clone(),
                    self.cfg.stats_interval,
                )),
            }),
            sampler: Sampler::new(roots.proc.clone()),
            interval: self.cfg.stats_interval,
        };
        reporter.run(stop).await;
        drop(link); // frpc keeps running for the next agent to adopt
    }

    /// `/init/host` GPU facts: NVML, else the self-test inventory, else PCI ids.
    fn gpu_facts(&self, nvml: Option<&gpu::Nvml>) -> Option<gpu::GpuFacts> {
        let selftest_file = self.cfg.data_dir.join(gpu::selftest::FILE_NAME);
        let sysfs = SysfsRoot::new(&self.cfg.sysfs_root);
        let inputs = FactsInputs {
            nvml,
            selftest_file: &selftest_file,
            sysfs: &sysfs,
            only: self.cfg.gpu_pci_addrs.as_deref(),
        };
        let (facts, source) = gpu::facts::host_facts(&inputs)?;
        tracing::info!(?source, name = %facts.name, count = facts.count, vram_gib = facts.vram_gib, max_cuda = facts.max_cuda, "GPU facts");
        Some(facts)
    }
}

fn init_request(cfg: &Config, identity: &Identity, manager: &Manager) -> InitRequest {
    let address = cfg.public_address.unwrap_or_else(host::address::detect_public_ipv4);
    InitRequest {
        agent_id: identity.agent_id.to_string(),
        agent_port: identity.agent_port,
        address: address.to_string(),
        fingerprint: host::facts::fingerprint(&host::Roots::default()),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        test_mode: false,
        backend: manager.backend_kind().map(BackendKind::as_str),
        gpus: Some(manager.gpu_pool().len() as u32),
    }
}
