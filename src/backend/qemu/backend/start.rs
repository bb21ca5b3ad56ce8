//! Starting a VM's QEMU: its GPUs bound first, QEMU spawned with the locked-memory limit
//! passthrough needs, its monitor checked, then the vCPUs let go.

use std::sync::Arc;

use super::{QMP_SOCKET_DEADLINE, QemuBackend, with_log};

/// How long a QEMU whose monitor closed gets to be reaped, so its exit and log are reported.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
use crate::backend::BackendError;
use crate::backend::qemu::accel::{Accel, kvm_failure};
use crate::backend::qemu::argv::{GpuPassthrough, NicPlan, VmPlan, qemu_argv};
use crate::backend::qemu::confine::QemuUser;
use crate::backend::qemu::layout::VmPaths;
use crate::backend::qemu::pin;
use crate::backend::qemu::process::ChildSetup;
use crate::backend::qemu::qmp::socket::MonitorSocket;
use crate::backend::qemu::qmp::{Qmp, QmpError};
use crate::backend::qemu::topology::Topology;
use crate::backend::qemu::vm::{QMP_TIMEOUT, Vm};
use crate::backend::qemu::vm_process::{Ladder, VmProcess};
use crate::backend::qemu::{diskio, gpus, process};
use crate::instance::model::Instance;
use crate::network::GuestNet;
use crate::network::host::TapQueues;
use std::os::fd::AsRawFd;

/// Queues of a VM's NIC at most (each is a pair of interrupt vectors and a vhost thread).
const MAX_QUEUES: usize = 8;

/// A VM's NIC, open for its QEMU to inherit.
struct Plugged {
    guest: GuestNet,
    queues: TapQueues,
}

impl QemuBackend {
    /// Binds the GPUs, starts QEMU on them, and on failure stops QEMU and releases them.
    pub(super) async fn start(
        &self,
        instance: &Instance,
        paths: &VmPaths,
    ) -> Result<Arc<Vm>, BackendError> {
        // Also checked at admission; a `start` from disk may come after KVM was found broken.
        if !instance.gpus.is_empty() {
            let refused = |reason| BackendError::Refused { reason };
            self.settings.accel.allows_gpus().map_err(refused)?;
        }
        // An image installed before QEMU had a user of its own (0600 under 0700) is opened by
        // that user now, as the overlay's backing file (a create, or a boot from disk).
        if let (Some(user), Ok(base)) = (&self.settings.user, self.base_image(&instance.spec)) {
            user.may_read_image(&base.path, &self.settings.data_dir)
                .map_err(|e| BackendError::op("start", e))?;
        }
        let passthrough = self.bind_gpus(instance).await?;
        // QEMU's user opens the groups' devices itself. (They go with the last device of
        // their group leaving vfio-pci at release: nothing to take back.)
        if let Err(e) = self.give_vfio_groups(&passthrough) {
            if let Err(release) = self.sweeper.release_gpus(&instance.id).await {
                tracing::error!(id = %instance.id, error = %release, "GPU release incomplete");
            }
            return Err(BackendError::op("give the GPUs to QEMU's user", e));
        }
        crate::fault::crash_point(crate::fault::Phase::AfterGpuBind);
        let under_kvm = self.settings.accel.current() == Accel::Kvm;
        let log_start = paths.qemu_log_len();
        let with_gpus = !passthrough.is_empty();
        let result = match self.start_qemu(instance, paths, passthrough.clone()).await {
            // QEMU could not even start under KVM (it opens /dev/kvm first): under `auto`,
            // once more under TCG. A VM with GPUs is never moved to TCG.
            Err(e) if under_kvm && !with_gpus => {
                let said = paths.qemu_log_since(log_start, 16 << 10);
                match kvm_failure(&said) {
                    Some(detail) if self.settings.accel.kvm_failed(&detail) => {
                        tracing::warn!(id = %instance.id, %detail, "starting the VM again under TCG");
                        self.start_qemu(instance, paths, passthrough).await
                    }
                    _ => Err(e),
                }
            }
            result => result,
        };
        if let Err(e) = &result {
            // A QEMU left paused with nobody watching it would make every later start answer
            // "still running"; with GPUs it also holds the devices open until it is gone.
            tracing::warn!(id = %instance.id, error = %e, "VM start failed; stopping its QEMU");
            if let Err(stop) = self.sweeper.stop_found(&instance.id, &Ladder::abort()).await {
                tracing::error!(id = %instance.id, error = %stop, "cannot stop QEMU");
            } else if !instance.gpus.is_empty()
                && let Err(e) = self.sweeper.release_gpus(&instance.id).await
            {
                tracing::error!(id = %instance.id, error = %e, "GPU release incomplete")
            }
        }
        result
    }

    fn give_vfio_groups(
        &self,
        passthrough: &[GpuPassthrough],
    ) -> Result<(), crate::backend::qemu::confine::ConfineError> {
        let Some(user) = &self.settings.user else { return Ok(()) };
        let sysfs = &self.settings.vfio.sysfs;
        let mut groups: Vec<u32> = passthrough
            .iter()
            .flat_map(|gpu| gpu.functions.iter())
            .filter_map(|f| f.parse().ok())
            .filter_map(|addr| sysfs.iommu_group(&addr).ok().flatten())
            .collect();
        groups.sort_unstable();
        groups.dedup();
        // The kernel makes a group's node when its first device binds to vfio-pci; one that is
        // missing is QEMU's to report (it opens it), in its own words.
        let dev = &self.settings.dev_vfio;
        groups.retain(|g| dev.join(g.to_string()).exists());
        QemuUser::vfio_groups(Some(user), dev, &groups)
    }

    /// Binds the instance's GPUs with the host's NVML closed: the NVIDIA driver does not let
    /// go of a GPU whose `/dev/nvidiaN` a process (this one, through NVML) holds open.
    async fn bind_gpus(&self, instance: &Instance) -> Result<Vec<GpuPassthrough>, BackendError> {
        let host = self.host_nvml().filter(|_| !instance.gpus.is_empty());
        let Some(host) = host else { return gpus::bind(&self.settings.vfio, instance).await };
        host.suspend();
        let bound = gpus::bind(&self.settings.vfio, instance).await;
        // Open again for the GPUs still on the driver (those now on vfio-pci are not seen).
        let _ = tokio::task::spawn_blocking(move || host.resume()).await;
        bound
    }

    /// Starts QEMU paused on the prepared files, checks its monitor, then lets it run.
    async fn start_qemu(
        &self,
        instance: &Instance,
        paths: &VmPaths,
        passthrough: Vec<GpuPassthrough>,
    ) -> Result<Arc<Vm>, BackendError> {
        crate::fsutil::ensure_private_dir(&paths.run_dir)
            .map_err(|e| BackendError::op("start", e))?;
        let _ = std::fs::remove_file(&paths.legacy_qmp);
        // Each QEMU writes a log of its own (made here: QEMU cannot create files in the VM's
        // dir); the last one's is kept as serial.log.1.
        paths.rotate_serial_log().map_err(|e| BackendError::op("start", e))?;
        paths.create_serial_log().map_err(|e| BackendError::op("start", e))?;
        // Made again after a reboot of the host (the run dir is on tmpfs).
        self.give_to_qemu(paths).map_err(|e| BackendError::op("start", e))?;
        let topology = self.topology(instance)?;
        let disk_io = diskio::probe(&self.settings.qemu_binary, &paths.dir).await;
        let mut plan = self.plan(instance, paths, topology, disk_io);
        plan.gpus = passthrough;
        // Held until QEMU has its own copies: closing them is what takes a tap away.
        let nic = self.plug(instance, &plan).await?;
        plan.nic = Some(NicPlan {
            mac: nic.guest.mac.clone(),
            tap_fds: nic.queues.taps.iter().map(AsRawFd::as_raw_fd).collect(),
            vhost_fds: nic.queues.vhost.iter().map(AsRawFd::as_raw_fd).collect(),
        });
        // Bound by the agent where QEMU cannot touch the path; QEMU gets the listener.
        let monitor = MonitorSocket::bind(&paths.qmp)
            .map_err(|e| BackendError::op("make QEMU's monitor socket", e))?;
        plan.qmp_fd = Some(monitor.fd());
        let mut inherit: Vec<i32> =
            plan.nic.iter().flat_map(|n| n.tap_fds.iter().chain(&n.vhost_fds)).copied().collect();
        inherit.push(monitor.fd());
        let setup = ChildSetup {
            // VFIO pins all guest memory for DMA.
            memlock: (!plan.gpus.is_empty()).then(|| process::memlock_bytes(plan.memory_mib)),
            user: self.settings.user.as_ref(),
            inherit: &inherit,
        };
        let argv = qemu_argv(&plan);
        let owner = self.owner(&instance.id);
        let binary = &self.settings.qemu_binary;
        let process = VmProcess::spawn(owner, binary, &argv, &paths.qemu_log, &setup)
            .map_err(|e| BackendError::op("start QEMU", e))?;
        drop(nic);
        // QEMU holds the listener now: one that dies closes it, so a connection waiting for
        // its greeting ends at once instead of at the deadline.
        drop(monitor);
        let pid = process.pid();
        let qmp = match Self::let_run(&process, paths, &plan.topology).await {
            Ok(qmp) => qmp,
            Err(e) => {
                // Stopped by whoever started it: a QEMU left paused makes every later start
                // answer "still running", and holds its GPUs.
                if let Err(stop) = process.stop(&Ladder::abort()).await {
                    tracing::error!(id = %instance.id, error = %stop, "cannot stop QEMU");
                }
                return Err(e);
            }
        };
        let vm = Vm::watch(process, qmp, paths.clone(), self.events.clone());
        tracing::info!(id = %instance.id, pid, accel = plan.accel.as_str(), "VM started");
        Ok(vm)
    }

    /// The VM's tap, opened on the bridge with a queue per vCPU (at most 8) and vhost-net
    /// under KVM (vhost needs KVM's eventfds; under TCG QEMU would fall back anyway).
    async fn plug(&self, instance: &Instance, plan: &VmPlan) -> Result<Plugged, BackendError> {
        let Some(guest) = instance.network.clone() else {
            let detail = "its record predates the agent's bridge (it ran on QEMU's user network); \
                          delete it and create it again";
            return Err(BackendError::op("start", detail));
        };
        let queues = (plan.vcpus as usize).clamp(1, MAX_QUEUES);
        let vhost = plan.accel == Accel::Kvm;
        let queues = self
            .settings
            .network
            .plug_vm(&instance.id, &guest, queues, vhost)
            .await
            .map_err(|e| BackendError::op("put the VM on the bridge", e))?;
        Ok(Plugged { guest, queues })
    }

    /// Connects to QEMU's monitor. QEMU creates the socket file when it binds, a moment
    /// before it listens: a refused connection is tried again while QEMU lives (seen under
    /// load), up to the socket deadline.
    async fn connect_monitor(process: &VmProcess, paths: &VmPaths) -> Result<Qmp, BackendError> {
        let until = tokio::time::Instant::now() + QMP_SOCKET_DEADLINE;
        loop {
            match Qmp::connect(paths.monitor(), QMP_TIMEOUT).await {
                Err(QmpError::Connect { refused: true, .. })
                    if tokio::time::Instant::now() < until && !process.has_exited() =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Ok(qmp) => return Ok(qmp),
                Err(e) => {
                    // A QEMU that failed to start closed the monitor: its own words say why.
                    let waiting = "its monitor's greeting";
                    let exited = match process.spawned() {
                        Some(child) => child.exited_before(waiting, EXIT_GRACE).await,
                        None => None,
                    };
                    return Err(match exited {
                        Some(exit) => BackendError::op("start QEMU", with_log(exit, paths)),
                        None => BackendError::op("connect to QEMU's monitor", e),
                    });
                }
            }
        }
    }

    /// QEMU's monitor once it answers, with its threads pinned and the vCPUs let go.
    async fn let_run(
        process: &VmProcess,
        paths: &VmPaths,
        topology: &Topology,
    ) -> Result<Qmp, BackendError> {
        let qmp = Self::connect_monitor(process, paths).await?;
        crate::fault::crash_point(crate::fault::Phase::AfterQemuStart);
        pin_threads(&qmp, process.pid(), topology).await?;
        qmp.cont().await.map_err(|e| BackendError::op("start the vCPUs", e))?;
        Ok(qmp)
    }
}

/// Pins the paused QEMU's threads as planned (the vCPU threads exist from the paused start
/// on); nothing to ask QEMU when the plan pins nothing.
async fn pin_threads(qmp: &Qmp, pid: u32, topology: &Topology) -> Result<(), BackendError> {
    let pins = topology.nodes.iter().any(|n| !n.pin.is_empty());
    if !pins && topology.io_cpus.is_empty() {
        return Ok(());
    }
    let vcpus = qmp.query_vcpu_threads().await.map_err(|e| BackendError::op("pin the vCPUs", e))?;
    // The agent's own view of /proc: these are real threads, whatever root the sweeper reads.
    let proc = std::path::Path::new("/proc");
    pin::pin(proc, pid, &vcpus, topology).map_err(|e| BackendError::op("pin the vCPUs", e))
}
