//! One line per NVIDIA GPU, with the driver it is bound to.

use crate::gpu::{GpuDriver, Inventory, NvidiaGpu};

use super::{Check, HostView, Status};

/// Every NVIDIA GPU (only those of `QUDATA_GPU_PCI_ADDRS` when set) and every listed address
/// that is not one.
pub fn gpus(view: &HostView) -> Vec<Check> {
    let inventory = match Inventory::scan(&view.sysfs, view.gpu_pci_addrs.as_deref()) {
        Ok(inventory) => inventory,
        Err(e) => {
            return vec![Check::new("gpu", Status::Fail, e.to_string(), "mount sysfs on /sys")];
        }
    };
    let mut checks: Vec<Check> = inventory
        .rejected
        .iter()
        .map(|r| Check::new("gpu", Status::Fail, r.to_string(), "fix QUDATA_GPU_PCI_ADDRS"))
        .collect();
    if inventory.gpus.is_empty() && checks.is_empty() {
        checks.push(Check::new(
            "gpu",
            Status::Warn,
            "no NVIDIA GPU found: Docker/VM without GPU only",
            "check the card is seated and seen by lspci",
        ));
    }
    checks.extend(inventory.gpus.iter().map(gpu_line));
    checks
}

fn gpu_line(gpu: &NvidiaGpu) -> Check {
    let detail = describe(gpu);
    match &gpu.driver {
        GpuDriver::Nvidia => Check::ok("gpu", format!("{detail} (vfio-pci when a VM starts)")),
        GpuDriver::VfioPci => Check::ok("gpu", format!("{detail} (ready for a VM)")),
        GpuDriver::Nouveau => Check::new(
            "gpu",
            Status::Fail,
            format!("{detail}: nouveau cannot be unbound safely"),
            "blacklist nouveau, update-initramfs -u, reboot",
        ),
        GpuDriver::None => Check::new(
            "gpu",
            Status::Warn,
            format!("{detail}: usable by VMs, not by Docker"),
            "install the NVIDIA driver",
        ),
        GpuDriver::Other(name) => Check::new(
            "gpu",
            Status::Warn,
            format!("{detail}: unexpected driver"),
            format!("unbind {name}; install the NVIDIA driver"),
        ),
    }
}

/// `0000:65:00.0 10de:2330 on nvidia, iommu group 12 (1 device), slot also .1`.
fn describe(gpu: &NvidiaGpu) -> String {
    let mut out = format!("{} 10de:{:04x} on {}", gpu.address, gpu.device, gpu.driver);
    match gpu.iommu_group {
        Some(group) => {
            let n = gpu.group_devices.len();
            let plural = if n == 1 { "" } else { "s" };
            out.push_str(&format!(", iommu group {group} ({n} device{plural})"));
        }
        None => out.push_str(", no iommu group"),
    }
    if !gpu.slot_functions.is_empty() {
        let functions: Vec<String> =
            gpu.slot_functions.iter().map(|f| format!(".{}", f.address.function())).collect();
        out.push_str(&format!(", slot also {}", functions.join(" ")));
    }
    out
}
