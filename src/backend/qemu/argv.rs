//! The QEMU command line, built by a pure function so golden tests pin every argument.

use std::path::{Path, PathBuf};

use super::accel::Accel;
use crate::instance::model::marker;

/// One passed-through GPU: every function of its PCI slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPassthrough {
    /// Host PCI addresses (`0000:65:00.0`) of the slot's functions, function 0 first.
    pub functions: Vec<String>,
    /// Sum of the sizes of the slot's 64-bit memory BARs, in bytes.
    pub bar_bytes: u64,
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
    /// `(host_port, guest_port)`: forwarded from 127.0.0.1 only.
    pub ports: Vec<(u16, u16)>,
    pub qmp_socket: PathBuf,
    pub pidfile: PathBuf,
    pub serial_log: PathBuf,
    pub gpus: Vec<GpuPassthrough>,
}

/// The arguments after the program name. The VM starts paused (`-S`): the caller checks it
/// over QMP, then sends `cont`.
pub fn qemu_argv(plan: &VmPlan) -> Vec<String> {
    let mut a = Args::default();
    a.pair("-name", marker(&plan.id));
    a.pair("-machine", format!("q35,accel={}", plan.accel.as_str()));
    a.pair("-cpu", if plan.accel == Accel::Kvm { "host" } else { "max" });
    a.pair("-smp", plan.vcpus.to_string());
    a.pair("-m", format!("{}M", plan.memory_mib));
    a.flag("-nodefaults");
    a.flag("-no-user-config");
    a.pair("-display", "none");
    a.flag("-S");
    let code = opt_path(&plan.ovmf_code);
    a.pair("-drive", format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"));
    a.pair("-drive", format!("if=pflash,format=raw,unit=1,file={}", opt_path(&plan.ovmf_vars)));
    a.pair("-drive", format!("if=virtio,format=qcow2,file={}", opt_path(&plan.overlay)));
    a.pair("-drive", format!("if=virtio,format=raw,readonly=on,file={}", opt_path(&plan.seed)));
    let mut netdev = String::from("user,id=net0");
    for (host, guest) in &plan.ports {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    a.pair("-netdev", netdev);
    a.pair("-device", "virtio-net-pci,netdev=net0");
    // Guests make SSH host keys at first boot; without an entropy source they wait for one.
    a.pair("-device", "virtio-rng-pci");
    a.pair("-qmp", format!("unix:{},server=on,wait=off", opt_path(&plan.qmp_socket)));
    // -pidfile and -serial file: take the rest of the argument verbatim.
    a.pair("-pidfile", plan.pidfile.display().to_string());
    a.pair("-serial", format!("file:{}", plan.serial_log.display()));
    if let Some(size) = mmio64_window(&plan.gpus) {
        a.pair("-global", format!("q35-pcihost.pci-hole64-size={size}"));
    }
    for (index, gpu) in plan.gpus.iter().enumerate() {
        gpu_args(&mut a, index, gpu);
    }
    a.0
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

/// The 64-bit PCI hole that fits every GPU's BARs: their sum rounded up to a power of two
/// (BARs are naturally aligned, so a power-of-two window packs them). `None` without GPUs:
/// QEMU's default is right then.
pub fn mmio64_window(gpus: &[GpuPassthrough]) -> Option<u64> {
    if gpus.is_empty() {
        return None;
    }
    let sum = gpus.iter().fold(0u64, |acc, g| acc.saturating_add(g.bar_bytes));
    Some(sum.max(1).checked_next_power_of_two().unwrap_or(1 << 63))
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
