//! `qudata-agent doctor`: is this host ready, and what to fix (the agent's `virt-host-validate`).
//!
//! Each check is a function over a [`HostView`], the roots it reads (`/proc`, `/sys`, `/dev`,
//! the `PATH` used for lookups, the data dir), so tests run every branch against temporary
//! trees. A check ends `ok`, `warn` (the agent works with less: TCG, Docker only, no GPU) or
//! `fail` (the configured backend or production mode cannot work).

mod backend;
mod exec;
mod gpus;
mod nvml;
mod output;
mod platform;
mod services;
mod tools;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::backend::qemu::accel::{self, Decision};
use crate::backend::qemu::disk;
use crate::config::{AccelChoice, BackendChoice, Config, FrpOverrides};
use crate::vfio::{PciAddress, SysfsRoot};

pub use exec::{find_program, version_line};
pub use output::{render_json, render_text};

/// The names of every check, in output order (`gpu` repeats once per GPU).
pub const CHECKS: &[&str] = &[
    "cpu",
    "kvm",
    "iommu",
    "vfio",
    "gpu",
    "nvml",
    "qemu",
    "qemu-img",
    "ovmf",
    "vm-network",
    "host-ports",
    "accel",
    "frpc",
    "frp",
    "docker",
    "datadir",
    "backend",
];

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do, in a few words; `None` when there is nothing to do.
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(check: &'static str, detail: impl Into<String>) -> Check {
        Check { check, status: Status::Ok, detail: detail.into(), fix: None }
    }

    pub fn new(
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check { check, status, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Running a helper program (`--version`) failed.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("{program} --version exited with {status}; reinstall it")]
    Exit { program: PathBuf, status: ExitStatus },
    #[error("cannot run {program}: {source}; reinstall it")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("{program} --version gave no answer within {timeout:?}; check that it is not hung")]
    Timeout { program: PathBuf, timeout: Duration },
}

/// What a missing capability is needed for; decides between `warn` and `fail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// VMs (the `qemu` backend); `auto` falls back to Docker or TCG.
    Vm,
    /// Containers (the `docker` backend); `auto` uses VMs where it can.
    Docker,
}

/// The parts of the host the checks read. Production uses [`HostView::from_config`];
/// tests point each root at a temporary tree.
#[derive(Clone, Debug)]
pub struct HostView {
    /// `/proc`: `cpuinfo`, `cmdline`, `sys/kernel/osrelease`.
    pub proc_root: PathBuf,
    pub sysfs: SysfsRoot,
    /// `/dev`: `kvm`.
    pub dev_root: PathBuf,
    /// `/lib/modules`: `<release>/modules.builtin`.
    pub lib_modules: PathBuf,
    /// `/usr/share/OVMF`.
    pub ovmf_dir: PathBuf,
    pub docker_socket: PathBuf,
    /// The `PATH` programs are looked up in.
    pub search_path: OsString,
    pub data_dir: PathBuf,
    /// `QUDATA_HOST_PORTS`.
    pub host_ports: std::ops::RangeInclusive<u16>,
    pub frpc_binary: PathBuf,
    /// `QUDATA_FRP_*`, over the credentials stored under `data_dir`.
    pub frp_overrides: FrpOverrides,
    pub gpu_pci_addrs: Option<Vec<PciAddress>>,
    /// `QUDATA_NVML_LIBRARY`.
    pub nvml_library: PathBuf,
    pub backend: BackendChoice,
    /// Deadline of each `--version` run.
    pub command_timeout: Duration,
    /// The accelerator decision `run` makes, made before the checks (it boots a probe guest).
    pub accel: AccelView,
}

/// What [`decide_accel`] found: the one decision `run` also uses (cached per boot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccelView {
    /// Not decided: what is missing to decide (QEMU, OVMF).
    Undecided(String),
    Decided {
        decision: Decision,
        choice: AccelChoice,
    },
    /// `QUDATA_QEMU_ACCEL=kvm` and KVM does not run the probe guest.
    Refused(String),
}

/// The accelerator decision exactly as `run` makes it (`accel::decide`): the answer cached
/// for this boot, or a probe guest booted now and its answer cached.
pub async fn decide_accel(cfg: &Config) -> AccelView {
    let ovmf = match disk::detect_ovmf(
        cfg.ovmf_code.as_deref(),
        cfg.ovmf_vars.as_deref(),
        disk::OVMF_CANDIDATES,
    ) {
        Ok(ovmf) => ovmf,
        Err(e) => return AccelView::Undecided(format!("cannot probe: {e}")),
    };
    match accel::decide(cfg.qemu_accel, &cfg.qemu_binary, &ovmf, &cfg.run_dir).await {
        Ok(decision) => AccelView::Decided { decision, choice: cfg.qemu_accel },
        Err(e @ accel::AccelError::KvmUnavailable { .. }) => AccelView::Refused(e.to_string()),
        Err(e) => AccelView::Undecided(format!("cannot probe: {e}")),
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl HostView {
    /// The real host, with the settings of `cfg`.
    pub fn from_config(cfg: &Config) -> HostView {
        let gpu_pci_addrs = cfg
            .gpu_pci_addrs
            .as_ref()
            .map(|list| list.iter().filter_map(|a| a.parse().ok()).collect());
        HostView {
            proc_root: "/proc".into(),
            sysfs: SysfsRoot::new(&cfg.sysfs_root),
            dev_root: "/dev".into(),
            lib_modules: "/lib/modules".into(),
            ovmf_dir: "/usr/share/OVMF".into(),
            docker_socket: cfg.docker_host.clone(),
            search_path: std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            data_dir: cfg.data_dir.clone(),
            host_ports: cfg.host_ports.clone(),
            frpc_binary: cfg.frpc_binary.clone(),
            frp_overrides: cfg.frp.clone(),
            gpu_pci_addrs,
            nvml_library: cfg.nvml_library.clone(),
            backend: cfg.backend,
            command_timeout: Duration::from_secs(5),
            accel: AccelView::Undecided("not probed yet".into()),
        }
    }

    /// Every root below `root` (for unit tests of the checks).
    #[cfg(test)]
    pub(crate) fn under(root: &std::path::Path, backend: BackendChoice) -> HostView {
        HostView {
            proc_root: root.join("proc"),
            sysfs: SysfsRoot::new(root.join("sys")),
            dev_root: root.join("dev"),
            lib_modules: root.join("lib/modules"),
            ovmf_dir: root.join("ovmf"),
            docker_socket: root.join("docker.sock"),
            search_path: root.join("bin").into_os_string(),
            data_dir: root.join("data"),
            host_ports: crate::ports::HOST_PORTS,
            frpc_binary: "frpc".into(),
            frp_overrides: FrpOverrides::default(),
            gpu_pci_addrs: None,
            nvml_library: root.join("libnvidia-ml.so.1"),
            backend,
            command_timeout: Duration::from_secs(1),
            accel: AccelView::Undecided("not probed".into()),
        }
    }

    /// The status of something missing: `fail` when the configured backend needs it.
    pub fn missing(&self, need: Need) -> Status {
        match (need, self.backend) {
            (Need::Vm, BackendChoice::Qemu) | (Need::Docker, BackendChoice::Docker) => Status::Fail,
            _ => Status::Warn,
        }
    }
}

/// Runs every check, in [`CHECKS`] order.
pub fn run_all(view: &HostView) -> Vec<Check> {
    let mut checks = vec![
        platform::cpu(view),
        platform::kvm(view),
        platform::iommu(view),
        platform::vfio_modules(view),
    ];
    checks.extend(gpus::gpus(view));
    checks.extend([
        nvml::nvml(view),
        tools::qemu(view),
        tools::qemu_img(view),
        tools::ovmf(view),
        tools::vm_network(view),
        platform::host_ports(view),
        platform::accel(view),
        tools::frpc(view),
        tools::frp_credentials(view),
        services::docker(view),
        services::data_dir(view),
    ]);
    let choice = backend::backend(view, &checks);
    checks.push(choice);
    checks
}

/// Whether the report has a failed check (exit status 1).
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

pub use backend::backend;
pub use gpus::gpus;
pub use nvml::nvml;
pub use platform::{accel, cpu, host_ports, iommu, kvm, vfio_modules};
pub use services::{data_dir, docker};
pub use tools::{frp_credentials, frpc, ovmf, qemu, qemu_img, vm_network};
