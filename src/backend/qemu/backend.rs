//! `QemuBackend`: the [`Lifecycle`] that runs each instance as a QEMU VM (DESIGN.md
//! "Decisions"); sweeping the host is its [`QemuSweeper`]'s.
//!
//! Everything it makes is named from the instance id ([`VmPaths`], the `-name qudata-<id>`
//! marker), so the record alone is enough to adopt, reboot or clean up a VM after a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::accel::Accelerator;
use super::argv::VmPlan;
use super::confine::QemuUser;
use super::disk::{self, Ovmf};
use super::diskio::DiskIo;
use super::gpus;
use super::layout::VmPaths;
use super::process;
use super::procfs::ProcRoot;
use super::qmp::Qmp;
use super::seed;
use super::sweeper::QemuSweeper;
use super::topology::{Reserved, Topology};
use super::vm::{QMP_TIMEOUT, Vm};
use super::vm_process::{Ladder, Owner, VmProcess};
use crate::backend::{Adoption, BackendError, EventSink, Lifecycle, Machine};
use crate::gpu::{GpuTelemetry, HostNvml};
use crate::guest::ManagementKey;
use crate::instance::model::{BackendKind, Instance};
use crate::instance::spec::Spec;
use crate::network::forward::Forwards;
use crate::network::{GuestNet, HostNetwork};

mod boot;
mod guest;
mod machine;
mod placement;
mod start;

pub use machine::QemuMachine;

/// What the QEMU backend needs to know about the host.
#[derive(Clone, Debug)]
pub struct QemuSettings {
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    pub ovmf: Ovmf,
    /// KVM or TCG for the next VM started (switched to TCG for good when KVM fails a VM).
    pub accel: Arc<Accelerator>,
    /// The default base image; named images live in `images_dir` as `<name>.qcow2`.
    pub base_image: PathBuf,
    pub images_dir: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    /// How long a guest may take from power-on to answering SSH; `None`: the accelerator's
    /// default (`boot::BOOT_DEADLINE_KVM`, `boot::BOOT_DEADLINE_TCG`).
    pub boot_deadline: Option<Duration>,
    /// How long an ACPI power-down may take before QEMU is told to quit.
    pub powerdown_grace: Duration,
    /// Where QEMUs are looked for (`/proc`; a tree of their own in tests).
    pub proc_root: ProcRoot,
    /// Binds and releases the GPUs of VMs.
    pub vfio: Arc<crate::vfio::Vfio>,
    /// The unprivileged user QEMU runs as (`None`: root, for tests of the argv alone).
    pub user: Option<QemuUser>,
    /// Where the VFIO group devices are (`/dev/vfio`).
    pub dev_vfio: PathBuf,
    /// The guests' bridge, taps and rules.
    pub network: Arc<HostNetwork>,
    /// The CPUs kept for the host (`QUDATA_HOST_RESERVED_CPUS`): no vCPU of a VM with GPUs
    /// runs there, and its QEMU's other threads run nowhere else.
    pub reserved_cpus: Reserved,
}

/// Holds no VM: each live VM is a [`QemuMachine`] held by its instance's task. Cheap to
/// clone (each machine keeps a copy for what it does on the host).
#[derive(Clone)]
pub struct QemuBackend {
    settings: QemuSettings,
    /// Stops, finds and removes what VMs leave behind (the host side, shared with recovery).
    sweeper: QemuSweeper,
    key: ManagementKey,
    events: EventSink,
    /// In-guest GPU metrics and the host's NVML (production mode only).
    gpu: Option<GpuTelemetry>,
}

/// Disk kept free for the host at every create (as the largest `storage_gb` leaves it).
const DISK_RESERVE: u64 = disk::HOST_DISK_RESERVE_GB << 30;

/// Time for QEMU to create its monitor socket after exec.
const QMP_SOCKET_DEADLINE: Duration = Duration::from_secs(20);

impl QemuBackend {
    pub fn new(settings: QemuSettings, key: ManagementKey, events: EventSink) -> QemuBackend {
        let sweeper = QemuSweeper {
            data_dir: settings.data_dir.clone(),
            run_dir: settings.run_dir.clone(),
            proc_root: settings.proc_root.clone(),
            vfio: settings.vfio.clone(),
            powerdown_grace: settings.powerdown_grace,
            host_nvml: None,
        };
        QemuBackend { settings, sweeper, key, events, gpu: None }
    }

    /// The sweeper of this backend's VMs (with its NVML, so GPUs an orphan held reach the
    /// stats again).
    pub fn sweeper(&self) -> QemuSweeper {
        self.sweeper.clone()
    }

    /// Runs an in-guest GPU metrics stream (`guest::metrics`) for every configured VM, and
    /// closes the host's NVML while GPUs are bound (the driver cannot let go of a GPU that
    /// NVML holds open).
    pub fn with_gpu_telemetry(mut self, gpu: GpuTelemetry) -> Self {
        self.sweeper.host_nvml = Some(gpu.host_nvml.clone());
        self.gpu = Some(gpu);
        self
    }

    /// The host's NVML, if this backend reports GPU metrics.
    pub(super) fn host_nvml(&self) -> Option<Arc<HostNvml>> {
        self.gpu.as_ref().map(|g| g.host_nvml.clone())
    }

    fn paths(&self, id: &str) -> VmPaths {
        self.sweeper.paths(id)
    }

    fn owner(&self, id: &str) -> Owner {
        self.sweeper.owner(id)
    }

    /// The VM image a spec boots: a plain name selects one in the images dir (and must
    /// exist there); no image, or a container reference, boots the host's default image.
    fn base_image(&self, spec: &Spec) -> Result<BaseImage, BackendError> {
        let default = || BaseImage::named_after(&self.settings.base_image);
        let Some(name) = spec.image.as_deref() else { return Ok(default()) };
        let known = || known_images(&self.settings.images_dir).join(", ");
        match classify_image(name) {
            ImageName::Plain => {
                let path = self.settings.images_dir.join(format!("{name}.qcow2"));
                if path.is_file() {
                    return Ok(BaseImage { path, name: name.to_owned() });
                }
                let reason =
                    format!("{name:?} is not a VM image known to this host (known: {})", known());
                Err(BackendError::Unsupported { field: "image", reason })
            }
            // Running the container itself inside the VM is a later step: the default image
            // boots, and the answer says so (`vm_image`).
            ImageName::Container => Ok(default()),
            ImageName::Invalid => {
                let reason = format!(
                    "{name:?} is neither a VM image known to this host (known: {}) nor a \
                     container image reference (like owner/name:tag)",
                    known()
                );
                Err(BackendError::Unsupported { field: "image", reason })
            }
        }
    }

    fn plan(
        &self,
        instance: &Instance,
        paths: &VmPaths,
        topology: Topology,
        disk_io: DiskIo,
    ) -> VmPlan {
        VmPlan {
            id: instance.id.clone(),
            accel: self.settings.accel.current(),
            vcpus: instance.spec.cpus,
            memory_mib: instance.spec.memory_mib,
            ovmf_code: self.settings.ovmf.code.clone(),
            ovmf_vars: paths.vars.clone(),
            overlay: paths.overlay.clone(),
            seed: paths.seed.clone(),
            nic: None,
            qmp_socket: paths.qmp.clone(),
            qmp_fd: None, // set at the start, which binds it
            pidfile: paths.pidfile.clone(),
            serial_log: paths.serial_log.clone(),
            gpus: Vec::new(),
            topology,
            disk_io,
        }
    }

    /// `127.0.0.1:<host port>` → the guest, for each published port (see `network::forward`).
    async fn forwards(&self, instance: &Instance) -> Result<Option<Forwards>, BackendError> {
        let Some(guest) = &instance.network else { return Ok(None) };
        let ports: Vec<(u16, u16)> =
            instance.ports.iter().map(|p| (p.host_port, p.guest_port)).collect();
        let forwards = Forwards::open(guest.address, &ports).await;
        forwards.map(Some).map_err(|e| BackendError::op("forward the published ports", e))
    }

    /// Builds the disk, firmware variables and seed of a new VM.
    async fn prepare(&self, instance: &Instance, paths: &VmPaths) -> Result<(), BackendError> {
        let BaseImage { path: base, name } = self.base_image(&instance.spec)?;
        if let Some(requested) = instance.spec.image.as_deref().filter(|i| *i != name) {
            tracing::info!(
                id = %instance.id,
                image = %crate::text::printable(requested, 255),
                vm_image = %name,
                "the request names a container image; this host runs VMs, so the VM boots its \
                 default VM image"
            );
        }
        for dir in [&paths.dir, &paths.run_dir] {
            crate::fsutil::ensure_private_dir(dir).map_err(|e| BackendError::op("create", e))?;
        }
        disk::create_overlay(
            &self.settings.qemu_img,
            &base,
            &paths.overlay,
            instance.spec.storage_gb,
        )
        .await
        .map_err(|e| BackendError::op("create the disk", e))?;
        crate::fault::crash_point(crate::fault::Phase::AfterOverlay);
        disk::copy_vars(&self.settings.ovmf.vars_template, &paths.vars)
            .map_err(|e| BackendError::op("create the firmware variables", e))?;
        let hostname = instance.marker();
        let management_key = self.key.public_line();
        let content = seed::SeedContent {
            instance_id: &instance.id,
            hostname: &hostname,
            management_public_key: &management_key,
            mac: instance.network.as_ref().map(|n| n.mac.as_str()),
        };
        seed::build_seed(&paths.seed, &content)
            .await
            .map_err(|e| BackendError::op("create the seed", e))?;
        self.give_to_qemu(paths).map_err(|e| BackendError::op("create", e))
    }

    /// Gives QEMU's user the files it writes (disk, firmware variables, serial log), the seed
    /// it reads and its run dir (it creates the monitor socket and pidfile there), and a way
    /// through the directories above them. The VM's data dir stays root's and traverse-only:
    /// an escaped QEMU cannot put a link where the agent, as root, reads or writes (the logs,
    /// `known_hosts`, the firmware variables' copy).
    fn give_to_qemu(&self, paths: &VmPaths) -> Result<(), super::confine::ConfineError> {
        let Some(user) = &self.settings.user else { return Ok(()) };
        for dir in [&paths.dir, &paths.run_dir] {
            let above = dir.ancestors().skip(1).take(2);
            for parent in above.filter(|p| !p.as_os_str().is_empty()) {
                user.traverse(parent)?;
            }
        }
        user.traverse(&paths.dir)?;
        user.own(&paths.run_dir)?;
        for file in [&paths.overlay, &paths.vars, &paths.seed, &paths.serial_log] {
            if file.exists() {
                user.own(file)?;
            }
        }
        Ok(())
    }
}

/// A VM image: its file and the name answers report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BaseImage {
    pub path: PathBuf,
    pub name: String,
}

impl BaseImage {
    /// The default image, named after the file it is (through a link such as `base.qcow2` →
    /// `qudata-guest.qcow2`, the target's name).
    fn named_after(path: &Path) -> BaseImage {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned);
        let name = stem(&real).or_else(|| stem(path)).unwrap_or_else(|| "base".into());
        BaseImage { path: path.to_owned(), name }
    }
}

/// What the `image` of a request is on a VM host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ImageName {
    /// A VM image's name in the images dir (`[A-Za-z0-9._-]`, not starting with a dot).
    Plain,
    /// A container reference: `[registry/]owner/name[:tag][@digest]`, i.e. one with a `/`,
    /// `:` or `@` that Docker would accept.
    Container,
    Invalid,
}

pub(crate) fn classify_image(name: &str) -> ImageName {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with('.');
    if plain {
        return ImageName::Plain;
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
    let reference = name.len() <= 255
        && name.contains(['/', ':', '@'])
        && name.chars().all(allowed)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("//")
        && !name.ends_with([':', '/', '@']);
    if reference { ImageName::Container } else { ImageName::Invalid }
}

fn known_images(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".qcow2").map(str::to_owned))
        .collect();
    names.sort();
    if names.is_empty() {
        names.push("none".into());
    }
    names
}

fn with_log(e: process::ProcessError, paths: &VmPaths) -> String {
    let log = super::layout::read_tail(&paths.qemu_log, 4 << 10);
    let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    if last.is_empty() { e.to_string() } else { format!("{e}: {last}") }
}

#[async_trait]
impl Lifecycle for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn guest_network(&self, held: &[Instance]) -> Result<Option<GuestNet>, BackendError> {
        let taken = held.iter().filter_map(|i| i.network.as_ref()).map(|g| g.address);
        let guest = self.settings.network.allocate(taken);
        guest.map(Some).map_err(|e| BackendError::Refused { reason: e.to_string() })
    }

    fn validate(&self, spec: &Spec) -> Result<(), BackendError> {
        self.base_image(spec).map(drop)
    }

    fn vm_image(&self, spec: &Spec) -> Option<String> {
        self.base_image(spec).ok().map(|image| image.name)
    }

    fn check_disk(&self, spec: &Spec, held: &[Instance]) -> Result<(), BackendError> {
        let free = crate::fsutil::free_bytes(&self.settings.data_dir)
            .map_err(|e| BackendError::op("read the free disk space", e))?;
        let held: Vec<(u64, u64)> = held
            .iter()
            .map(|i| {
                let overlay = self.paths(&i.id).overlay;
                let used = std::fs::metadata(&overlay).map_or(0, |m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                });
                (i.spec.storage_gb << 30, used)
            })
            .collect();
        disk::room_for(spec.storage_gb << 30, free, DISK_RESERVE, &held)
            .map_err(|reason| BackendError::Refused { reason })
    }

    fn check_memory(&self, spec: &Spec, gpus: &[String]) -> Result<(), BackendError> {
        self.fits(spec, gpus)
    }

    fn check_gpus(&self, gpus: &[String]) -> Result<(), BackendError> {
        if !gpus.is_empty() {
            self.settings.accel.allows_gpus().map_err(|reason| BackendError::Refused { reason })?;
        }
        gpus::check(&self.settings.vfio, gpus)
    }

    async fn launch(&self, instance: &Instance) -> Result<Arc<dyn Machine>, BackendError> {
        let paths = self.paths(&instance.id);
        let result = match self.prepare(instance, &paths).await {
            Ok(()) => self.start(instance, &paths).await,
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(vm) => self.forwards(instance).await.map(|f| QemuMachine::new(self.clone(), vm, f)),
            Err(e) => Err(e),
        };
        match result {
            Ok(machine) => Ok(machine),
            Err(e) => {
                tracing::warn!(id = %instance.id, error = %e, "VM launch failed; removing what it made");
                if let Err(cleanup) = self.destroy(instance, None).await {
                    tracing::error!(id = %instance.id, error = %cleanup, "launch rollback incomplete");
                }
                Err(e)
            }
        }
    }

    async fn boot(&self, instance: &Instance) -> Result<Arc<dyn Machine>, BackendError> {
        let paths = self.paths(&instance.id);
        if VmProcess::adopt(&self.owner(&instance.id)).is_some() {
            return Err(BackendError::op("boot", "the VM's QEMU is still running"));
        }
        if !paths.overlay.is_file() {
            let detail = format!("its disk {} is missing", paths.overlay.display());
            return Err(BackendError::Gone { detail });
        }
        let vm = self.start(instance, &paths).await?;
        let machine = QemuMachine::new(self.clone(), vm, None);
        match self.forwards(instance).await {
            Ok(forwards) => machine.set_forwards(forwards),
            Err(e) => {
                let _ = machine.stop_now().await;
                return Err(e);
            }
        }
        Ok(machine)
    }

    async fn adopt(&self, instance: &Instance) -> Result<Adoption, BackendError> {
        let paths = self.paths(&instance.id);
        // The pidfile first; a QEMU whose pidfile was deleted is still found by its command line.
        let Some(process) = VmProcess::adopt(&self.owner(&instance.id)) else {
            let detail = "no QEMU process carries its marker".to_owned();
            return Ok(Adoption::Gone { detail });
        };
        let qmp = Qmp::connect(paths.monitor(), QMP_TIMEOUT)
            .await
            .map_err(|e| BackendError::op("reconnect to QEMU's monitor", e))?;
        // Only a start cut short between spawn and `cont` leaves a VM in prelaunch: finish it.
        // (A VM paused by `stop` is `paused`, and stays so.)
        let state = qmp.query_status().await.map_err(|e| BackendError::op("adopt", e))?;
        if state.status == qapi_qmp::RunState::prelaunch {
            tracing::info!(id = %instance.id, "adopted VM never started its vCPUs: starting them");
            qmp.cont().await.map_err(|e| BackendError::op("start the vCPUs", e))?;
        }
        let pid = process.pid();
        let vm = Vm::watch(process, qmp, paths, self.events.clone());
        let machine = QemuMachine::new(self.clone(), vm, None);
        // Its rules and DHCP entry are back before anything else: the VM keeps its network.
        if let Some(guest) = &instance.network {
            let adopted = self.settings.network.adopt_vm(&instance.id, guest).await;
            let forwards = match adopted {
                Ok(()) => self.forwards(instance).await,
                Err(e) => Err(BackendError::op("put the VM back on the bridge", e)),
            };
            match forwards {
                Ok(forwards) => machine.set_forwards(forwards),
                Err(error) => return Ok(Adoption::Unsure { machine, error }),
            }
        }
        tracing::info!(id = %instance.id, pid, "VM adopted");
        Ok(Adoption::Adopted(machine))
    }

    async fn destroy(
        &self,
        instance: &Instance,
        machine: Option<Arc<dyn Machine>>,
    ) -> Result<(), BackendError> {
        // Stopped through the machine the task holds; a QEMU nobody holds (a launch cut
        // short, one that could not be adopted) is found by its marker.
        match machine {
            Some(machine) => machine.stop().await?,
            None => {
                let ladder = Ladder::graceful(self.settings.powerdown_grace);
                self.sweeper.stop_found(&instance.id, &ladder).await?;
            }
        }
        crate::fault::crash_point(crate::fault::Phase::DuringTeardown);
        self.sweeper.remove(&instance.id).await?;
        // After QEMU: its tap went with it, and its address may be given again.
        self.settings
            .network
            .unplug_vm(&instance.id)
            .await
            .map_err(|e| BackendError::op("take the VM off the bridge", e))
    }
}

#[cfg(test)]
mod image_tests {
    use super::*;

    #[test]
    fn image_names_on_a_vm_host() {
        for plain in ["guest", "ubuntu", "debian-13.qcow", "a_b-1"] {
            assert_eq!(classify_image(plain), ImageName::Plain, "{plain}");
        }
        for container in [
            "pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime",
            "ubuntu:22.04",
            "registry.example.com:5000/team/app:1",
            "nvcr.io/nvidia/pytorch@sha256:0123abcd",
        ] {
            assert_eq!(classify_image(container), ImageName::Container, "{container}");
        }
        for invalid in ["", ".hidden", "a//b", "bad name:1", "x:", "/abs:1", "$(id):1", "a\nb"] {
            assert_eq!(classify_image(invalid), ImageName::Invalid, "{invalid:?}");
        }
    }

    #[test]
    fn the_default_image_is_named_after_the_file_its_link_points_to() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("qudata-guest.qcow2");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("base.qcow2");
        std::os::unix::fs::symlink("qudata-guest.qcow2", &link).unwrap();
        let image = BaseImage::named_after(&link);
        assert_eq!(image, BaseImage { path: link, name: "qudata-guest".into() });
        assert_eq!(BaseImage::named_after(&dir.path().join("gone.qcow2")).name, "gone");
    }
}
