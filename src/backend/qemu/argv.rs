//! The QEMU command line, built by a pure function so golden tests pin every argument.

use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::diskio::DiskIo;
use super::topology::{Backing, Topology, cpulist};
use crate::instance::model::marker;

/// One passed-through GPU: every function of its PCI slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPassthrough {
    /// Host PCI addresses (`0000:65:00.0`) of the slot's functions, function 0 first.
    pub functions: Vec<String>,
    /// Sum of the sizes of the slot's 64-bit memory BARs, in bytes.
    pub bar_bytes: u64,
}

/// A virtio NIC on a tap the agent opened (`network::HostNetwork::plug_vm`): QEMU inherits
/// the descriptors and never needs the right to create taps or open `/dev/vhost-net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicPlan {
    pub mac: String,
    /// One descriptor per queue of the tap.
    pub tap_fds: Vec<i32>,
    /// `/dev/vhost-net`, one per queue; empty: QEMU moves the packets itself.
    pub vhost_fds: Vec<i32>,
}

/// Everything the command line of one VM depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    pub id: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// OVMF code image, shared and read-only.
    pub ovmf_code: PathBuf,
    /// This VM's own copy of the OVMF variables store.
    pub ovmf_vars: PathBuf,
    /// qcow2 overlay on the base image.
    pub overlay: PathBuf,
    /// NoCloud seed (vfat labelled `cidata`).
    pub seed: PathBuf,
    /// The VM's NIC; `None`: no network device at all.
    pub nic: Option<NicPlan>,
    /// Where the agent connects to QEMU's monitor.
    pub qmp_socket: PathBuf,
    /// The monitor's listening socket, bound by the agent at `qmp_socket` and inherited by
    /// QEMU ([`super::qmp::socket::MonitorSocket`]); `None`: QEMU binds `qmp_socket` itself
    /// (tests that drive QEMU without the agent's layout).
    pub qmp_fd: Option<i32>,
    pub pidfile: PathBuf,
    pub serial_log: PathBuf,
    pub gpus: Vec<GpuPassthrough>,
    /// Guest NUMA nodes and sockets, memory backing, and where on the host they go.
    pub topology: Topology,
    /// The overlay's cache and submission mode, as probed on this host.
    pub disk_io: DiskIo,
}

/// QEMU's seccomp filter, as libvirt sets it.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The arguments after the program name. The VM starts paused (`-S`): the caller checks it
/// over QMP, then sends `cont`.
pub fn qemu_argv(plan: &VmPlan) -> Vec<String> {
    let mut a = Args::default();
    a.pair("-name", marker(&plan.id));
    let one_node = plan.topology.nodes.len() == 1;
    // One guest node: the machine's RAM is the backend itself; several: one `-numa` each.
    let ram = if one_node { ",memory-backend=mem0" } else { "" };
    a.pair("-machine", format!("q35,accel={}{ram}", plan.accel.as_str()));
    let cpu = cpu_model(plan.accel);
    // GPUs' BARs go high in the guest's physical address space: the guest must see the
    // host's real address width, not QEMU's default 40 bits (1 TiB).
    let cpu =
        if plan.gpus.is_empty() { cpu.to_owned() } else { format!("{cpu},host-phys-bits=on") };
    a.pair("-cpu", cpu);
    let t = &plan.topology;
    a.pair(
        "-smp",
        format!("{},sockets={},cores={},threads={}", plan.vcpus, t.sockets, t.cores, t.threads),
    );
    a.pair("-m", format!("{}M", plan.memory_mib));
    memory_args(&mut a, t);
    // The disk's I/O runs in a thread of its own, which the agent keeps off the vCPUs' CPUs.
    a.pair("-object", "iothread,id=io0");
    a.flag("-nodefaults");
    a.flag("-no-user-config");
    // seccomp: no obsolete system calls, no set*uid (QEMU starts as its user, see
    // `VmProcess::spawn`), no new processes, no scheduler or cgroup changes.
    a.pair("-sandbox", SANDBOX);
    a.pair("-display", "none");
    a.flag("-S");
    let code = opt_path(&plan.ovmf_code);
    a.pair("-drive", format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"));
    a.pair("-drive", format!("if=pflash,format=raw,unit=1,file={}", opt_path(&plan.ovmf_vars)));
    // The disk is the only boot option (the firmware's shell aside): a guest that cannot boot
    // from it is seen at once, never tries the network (PXE, HTTP boot), and boots sooner.
    let overlay = opt_path(&plan.overlay);
    let io = plan.disk_io.drive_options();
    a.pair("-drive", format!("if=none,id=disk0,format=qcow2,file={overlay},{io}"));
    a.pair("-device", "virtio-blk-pci,drive=disk0,iothread=io0,bootindex=1");
    let seed = opt_path(&plan.seed);
    a.pair("-drive", format!("if=none,id=seed0,format=raw,readonly=on,file={seed}"));
    a.pair("-device", "virtio-blk-pci,drive=seed0");
    if let Some(nic) = &plan.nic {
        nic_args(&mut a, nic);
    }
    // Guests make SSH host keys at first boot; without an entropy source they wait for one.
    a.pair("-device", "virtio-rng-pci");
    // A guest kernel panic becomes a QMP event instead of a silent hang.
    a.pair("-device", "pvpanic");
    match plan.qmp_fd {
        Some(fd) => {
            a.pair("-chardev", format!("socket,id=qmp,fd={fd},server=on,wait=off"));
            a.pair("-mon", "chardev=qmp,mode=control");
        }
        None => a.pair("-qmp", format!("unix:{},server=on,wait=off", opt_path(&plan.qmp_socket))),
    }
    // -pidfile takes the rest of the argument verbatim.
    a.pair("-pidfile", plan.pidfile.display().to_string());
    // Appended to, so the agent can cut it while QEMU writes (`VmPaths::cap_serial_log`).
    let serial = format!("file,id=serial0,path={},append=on", opt_path(&plan.serial_log));
    a.pair("-chardev", serial);
    a.pair("-serial", "chardev:serial0");
    if let Some(mib) = mmio64_window_mib(&plan.gpus) {
        // OVMF sizes the 64-bit PCI aperture from this, not from QEMU's pci-hole64 property.
        a.pair("-fw_cfg", format!("name=opt/ovmf/X-PciMmio64Mb,string={mib}"));
    }
    for (index, gpu) in plan.gpus.iter().enumerate() {
        gpu_args(&mut a, index, gpu);
    }
    a.0
}

/// The CPU model VMs get (and the accelerator probe boots): the host's own under KVM, every
/// feature QEMU can emulate under TCG.
pub fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// One memory backend per guest node: memfd (no file to clean up; shareable), on huge pages
/// when planned, bound to its host node when placed, and faulted in before the guest runs
/// only on huge pages: normal memory of a VM with GPUs is faulted in by VFIO's pinning at
/// start anyway, and a VM without GPUs should start at once and take memory as it uses it.
fn memory_args(a: &mut Args, t: &Topology) {
    let several = t.nodes.len() > 1;
    for (i, node) in t.nodes.iter().enumerate() {
        let mut mem = format!("memory-backend-memfd,id=mem{i},size={}M", node.memory_mib);
        if let Backing::HugePages { page_kib } = t.backing {
            mem.push_str(&format!(",hugetlb=on,hugetlbsize={}", page_size(page_kib)));
        }
        if let Some(host) = node.host_node {
            mem.push_str(&format!(",host-nodes={host},policy=bind"));
        }
        if let Some(threads) = node.prealloc_threads {
            mem.push_str(&format!(",prealloc=on,prealloc-threads={threads}"));
        }
        a.pair("-object", mem);
        if several {
            // QEMU takes a list of CPUs as the option repeated.
            let cpus = cpulist::format(&node.vcpus, ",cpus=");
            a.pair("-numa", format!("node,nodeid={i},cpus={cpus},memdev=mem{i}"));
        }
    }
}

/// A page size as QEMU reads sizes (`1G`, `2M`).
fn page_size(kib: u64) -> String {
    if kib >= 1 << 20 && kib.is_multiple_of(1 << 20) {
        format!("{}G", kib >> 20)
    } else if kib.is_multiple_of(1024) {
        format!("{}M", kib >> 10)
    } else {
        format!("{kib}K")
    }
}

fn nic_args(a: &mut Args, nic: &NicPlan) {
    let list = |fds: &[i32]| fds.iter().map(i32::to_string).collect::<Vec<_>>().join(":");
    let queues = nic.tap_fds.len();
    let mut netdev = if queues == 1 {
        format!("tap,id=net0,fd={}", nic.tap_fds[0])
    } else {
        format!("tap,id=net0,fds={}", list(&nic.tap_fds))
    };
    match nic.vhost_fds.len() {
        0 => {}
        1 => netdev.push_str(&format!(",vhost=on,vhostfd={}", nic.vhost_fds[0])),
        _ => netdev.push_str(&format!(",vhost=on,vhostfds={}", list(&nic.vhost_fds))),
    }
    a.pair("-netdev", netdev);
    // No option ROM: the firmware has no network boot to try.
    let mut device = format!("virtio-net-pci,netdev=net0,mac={},romfile=", nic.mac);
    if queues > 1 {
        // A receive and a transmit vector per queue, one for config changes, one for control.
        device.push_str(&format!(",mq=on,vectors={}", 2 * queues + 2));
    }
    a.pair("-device", device);
}

/// One root port per GPU so each slot keeps its functions together, as on the host. Guest
/// function numbers follow the order of `functions`, so function 0 is always present.
fn gpu_args(a: &mut Args, index: usize, gpu: &GpuPassthrough) {
    let port = format!("gpu{index}");
    let n = index + 1;
    a.pair("-device", format!("pcie-root-port,id={port},bus=pcie.0,chassis={n},slot={n}"));
    for (function, host) in gpu.functions.iter().enumerate() {
        let mut dev = format!("vfio-pci,host={host},bus={port},addr=00.{function}");
        if function == 0 {
            dev.push_str(",multifunction=on");
        }
        a.pair("-device", dev);
    }
}

/// OVMF's own default 64-bit aperture (32 GiB): never ask for less.
const MIN_MMIO64_MIB: u64 = 32 << 10;

/// The 64-bit MMIO aperture, in MiB, that fits every GPU's 64-bit BARs. `None` without GPUs:
/// OVMF's default is right then.
///
/// Each GPU sits behind its own root port, whose prefetchable window is aligned to, and
/// rounded up to, its largest BAR: an H100's 128 GiB + 32 MiB takes a 256 GiB window. BARs
/// are powers of two, so rounding each GPU's sum up to a power of two covers that. The total
/// is rounded up again and doubled: OVMF aligns the aperture to its size and puts the 64-bit
/// BARs of the other devices (virtio) there too, and a window too small leaves a GPU without
/// its BARs in the guest, while guest address space costs nothing.
pub fn mmio64_window_mib(gpus: &[GpuPassthrough]) -> Option<u64> {
    if gpus.is_empty() {
        return None;
    }
    let windows = gpus.iter().fold(0u64, |acc, g| acc.saturating_add(pow2(g.bar_bytes)));
    let bytes = pow2(windows).saturating_mul(2);
    Some((bytes >> 20).max(MIN_MMIO64_MIB))
}

fn pow2(bytes: u64) -> u64 {
    bytes.max(1).checked_next_power_of_two().unwrap_or(1 << 63)
}

/// A path inside a QEMU option list, where a comma is written as two.
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.to_owned());
    }

    fn pair(&mut self, flag: &str, value: impl Into<String>) {
        self.0.push(flag.to_owned());
        self.0.push(value.into());
    }
}

#[cfg(test)]
mod tests;
