//! Which backend builds instances on this host, and building it.
//!
//! A backend that cannot work here is not an error at start-up: the agent still registers,
//! reports and serves, and every create answers 503 with the reason given here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::choice::{order, passthrough};
use crate::backend::docker::error::DockerError;
use crate::backend::docker::{DockerBackend, DockerSettings};
use crate::backend::qemu::accel::{self, Accel, AccelError, Accelerator};
use crate::backend::qemu::confine::{ConfineError, QemuUser};
use crate::backend::qemu::disk::{self, DiskError};
use crate::backend::qemu::topology::Reserved;
use crate::backend::qemu::{QemuBackend, QemuSettings, QemuSweeper};
use crate::backend::{EventSink, HostSweeper, Lifecycle};
use crate::config::ConfigError;
use crate::config::{BackendChoice, Config};
use crate::gpu::GpuTelemetry;
use crate::guest::ManagementKey;
use crate::guest::keys::KeyError;
use crate::instance::model::BackendKind;
use crate::network::{HostNetwork, NetSettings};
use crate::vfio::{SysfsRoot, Vfio};

/// Time a guest gets to act on the ACPI power button before QEMU is told to quit.
const POWERDOWN_GRACE: Duration = Duration::from_secs(30);

/// The default base image when `QUDATA_BASE_IMAGE` is unset.
pub fn default_base_image(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("images").join("base.qcow2")
}

/// The VFIO side of this host, as the settings place it.
pub fn vfio(cfg: &Config) -> Vfio {
    Vfio::new(SysfsRoot::new(&cfg.sysfs_root), &cfg.data_dir)
}

/// The host side of the guests' network, as the settings place it (one per agent: every
/// backend and recovery share it).
pub fn network(cfg: &Config) -> Arc<HostNetwork> {
    Arc::new(HostNetwork::new(NetSettings {
        bridge: cfg.vm_bridge.clone(),
        subnet: cfg.vm_subnet,
        container_bridge: format!("{}c", cfg.vm_bridge),
        container_subnet: cfg.container_subnet,
        dns_upstream: cfg.vm_dns.clone(),
        bandwidth_mbit: cfg.vm_bandwidth_mbit,
        conntrack_limit: cfg.vm_conntrack_limit,
        blocked: cfg.vm_blocked.clone(),
        run_dir: cfg.run_dir.join("net").join(&cfg.vm_bridge),
        dnsmasq_binary: PathBuf::from("dnsmasq"),
    }))
}

/// Why one backend kind cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot list the host's GPUs: {0}")]
    Gpus(#[source] ConfigError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Firmware(#[from] DiskError),
    #[error(
        "the base VM image {} is missing; build one with image-builder/build-ci-guest.sh or \
         set QUDATA_BASE_IMAGE",
        path.display()
    )]
    NoBaseImage { path: PathBuf },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Confine(#[from] ConfineError),
}

/// No backend can run here: the choice's reason, and why each kind tried failed.
#[derive(Debug, thiserror::Error)]
#[error("{reason}, but {}", describe(.failures))]
pub struct NoBackend {
    pub reason: String,
    pub failures: Vec<(BackendKind, BuildError)>,
}

fn describe(failures: &[(BackendKind, BuildError)]) -> String {
    let each = failures.iter().map(|(kind, e)| format!("{}: {e}", kind.as_str()));
    each.collect::<Vec<_>>().join("; ")
}

/// The backend that runs instances, and the sweeper of its kind (which knows its NVML).
pub struct Chosen {
    pub lifecycle: Arc<dyn Lifecycle>,
    pub sweeper: Arc<dyn HostSweeper>,
}

/// Builds the backend for `gpus` (the ones offered to renters), or says in one sentence why
/// none can run here. The choice and its reason are logged. `gpu`: in-guest GPU metrics
/// and the host's NVML for the stats loop (production mode; VMs only).
pub async fn build(
    cfg: &Config,
    gpus: &[String],
    events: EventSink,
    gpu: Option<GpuTelemetry>,
    network: &Arc<HostNetwork>,
) -> Result<Chosen, NoBackend> {
    let sysfs = SysfsRoot::new(&cfg.sysfs_root);
    let order = order(cfg.backend, gpus.len(), &passthrough(&sysfs, gpus));
    let mut failures = Vec::new();
    for kind in &order.try_in_order {
        let built: Result<Chosen, BuildError> = match kind {
            BackendKind::Qemu => qemu(cfg, events.clone(), network).await.map(|backend| {
                let backend = match gpu.clone() {
                    Some(gpu) => backend.with_gpu_telemetry(gpu),
                    None => backend,
                };
                let sweeper = Arc::new(backend.sweeper());
                Chosen { lifecycle: Arc::new(backend), sweeper }
            }),
            BackendKind::Docker => docker(cfg, events.clone(), network).await.map(|backend| {
                backend.log_disk_limits();
                let backend = Arc::new(backend);
                Chosen { lifecycle: backend.clone(), sweeper: backend }
            }),
        };
        match built {
            Ok(chosen) => {
                let why = describe(&failures);
                tracing::info!(backend = kind.as_str(), reason = %order.reason, passed_over = %why, "backend chosen");
                return Ok(chosen);
            }
            Err(e) => failures.push((*kind, e)),
        }
    }
    Err(NoBackend { reason: order.reason, failures })
}

async fn docker(
    cfg: &Config,
    events: EventSink,
    network: &Arc<HostNetwork>,
) -> Result<DockerBackend, BuildError> {
    let owner = cfg.data_dir.display().to_string();
    let every_gpu = crate::gpu::pool::offered(&SysfsRoot::new(&cfg.sysfs_root), None)
        .map_err(BuildError::Gpus)?;
    let settings = DockerSettings {
        host_gpus: every_gpu.iter().map(ToString::to_string).collect(),
        unlimited_disk: cfg.docker_unlimited_disk,
        private_registries: cfg.docker_private_registries.clone(),
        pull: cfg.docker_pull,
        network: Some(network.clone()),
        ..DockerSettings::new(cfg.docker_host.clone(), owner)
    };
    let backend = DockerBackend::connect(settings, events).await?;
    tracing::info!(socket = %cfg.docker_host.display(), "Docker backend ready");
    Ok(backend)
}

/// The sweepers recovery finds and cleans up with: QEMU's (it needs only where things live:
/// no accelerator probe, key, base image or firmware), and Docker's when the engine answers
/// (not with `QUDATA_BACKEND=qemu`). For `recover`, and for the agent's start-up recovery
/// beside the sweeper of the backend it runs.
pub async fn sweepers(
    cfg: &Config,
    events: EventSink,
    network: &Arc<HostNetwork>,
) -> Vec<Arc<dyn HostSweeper>> {
    let qemu = QemuSweeper {
        data_dir: cfg.data_dir.clone(),
        run_dir: cfg.run_dir.clone(),
        proc_root: Default::default(),
        vfio: Arc::new(vfio(cfg)),
        powerdown_grace: POWERDOWN_GRACE,
        host_nvml: None,
    };
    let mut out: Vec<Arc<dyn HostSweeper>> = vec![Arc::new(qemu)];
    if cfg.backend != BackendChoice::Qemu && cfg.docker_host.exists() {
        let connect = tokio::time::timeout(Duration::from_secs(10), docker(cfg, events, network));
        match connect.await {
            Ok(Ok(docker)) => out.push(Arc::new(docker)),
            Ok(Err(e)) => tracing::warn!(error = %e, "containers are not checked"),
            Err(_) => {
                tracing::warn!("the Docker engine did not answer; containers are not checked")
            }
        }
    }
    out
}

/// The accelerator decision, loudly when `auto` found KVM unusable.
fn log_accel(cfg: &Config, decision: &accel::Decision) {
    let reason = &decision.reason;
    match (decision.accel, cfg.qemu_accel) {
        (Accel::Tcg, crate::config::AccelChoice::Auto) => tracing::warn!(
            %reason,
            "accelerator: TCG. KVM DOES NOT RUN GUESTS ON THIS HOST: VMs use software \
             emulation (many times slower) and cannot have GPUs; `qudata-agent doctor` shows why"
        ),
        (accel, _) => tracing::info!(%reason, "accelerator: {}", accel.as_str().to_uppercase()),
    }
}

async fn qemu(
    cfg: &Config,
    events: EventSink,
    network: &Arc<HostNetwork>,
) -> Result<QemuBackend, BuildError> {
    let ovmf = disk::detect_ovmf(
        cfg.ovmf_code.as_deref(),
        cfg.ovmf_vars.as_deref(),
        disk::OVMF_CANDIDATES,
    )?;
    let base_image = cfg.base_image.clone().unwrap_or_else(|| default_base_image(cfg));
    if !base_image.is_file() {
        return Err(BuildError::NoBaseImage { path: base_image });
    }
    let decision = accel::decide(cfg.qemu_accel, &cfg.qemu_binary, &ovmf, &cfg.run_dir).await?;
    log_accel(cfg, &decision);
    let accel =
        Arc::new(Accelerator::new(cfg.qemu_accel, decision, &cfg.qemu_binary, &ovmf, &cfg.run_dir));
    let key = ManagementKey::load_or_create(&cfg.data_dir.join("keys"))?;
    let user = QemuUser::ensure(&cfg.qemu_user)?;
    tracing::info!(user = %user.name, uid = user.uid, "QEMU runs as an unprivileged user");
    let settings = QemuSettings {
        qemu_img: disk::qemu_img_for(&cfg.qemu_binary),
        qemu_binary: cfg.qemu_binary.clone(),
        ovmf,
        accel,
        base_image,
        images_dir: cfg.data_dir.join("images"),
        data_dir: cfg.data_dir.clone(),
        run_dir: cfg.run_dir.clone(),
        boot_deadline: cfg.vm_boot_timeout,
        powerdown_grace: POWERDOWN_GRACE,
        proc_root: Default::default(),
        vfio: Arc::new(vfio(cfg)),
        user: Some(user),
        dev_vfio: PathBuf::from("/dev/vfio"),
        network: network.clone(),
        reserved_cpus: match &cfg.host_reserved_cpus {
            Some(cpus) => Reserved::Cpus(cpus.clone()),
            None => Reserved::FirstCoreOfEachNode,
        },
    };
    tracing::info!(base = %settings.base_image.display(), "QEMU backend ready");
    Ok(QemuBackend::new(settings, key, events))
}
