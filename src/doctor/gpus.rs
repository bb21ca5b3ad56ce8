//! One line per NVIDIA GPU: address, ids, IOMMU group and peers, driver, and whether it can be
//! passed through now, with the reason when not.

use crate::gpu::{GpuDriver, Inventory, NvidiaGpu};
use crate::vfio::{Vfio, VfioError};

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
    checks.extend(inventory.gpus.iter().map(|gpu| gpu_line(view, gpu)));
    checks
}

/// One line per GPU: what it is, its group and peers, its driver, and whether a VM can get
/// it now, with the reason when not (the same checks a bind makes, reading only).
fn gpu_line(view: &HostView, gpu: &NvidiaGpu) -> Check {
    let vfio = Vfio {
        sysfs: view.sysfs.clone(),
        proc_root: view.proc_root.clone(),
        record_dir: crate::vfio::record_dir(&view.data_dir),
        quarantine: crate::vfio::Quarantine::new(&view.data_dir),
        timeouts: Default::default(),
    };
    let detail = describe(gpu);
    let refusal = vfio.plan(None, std::slice::from_ref(&gpu.address)).err();
    let mut functions = vec![gpu.address.clone()];
    functions.extend(gpu.slot_functions.iter().map(|f| f.address.clone()));
    let reset = vfio.reset_kind(&functions);
    let line = |status, note: String, fix: Option<String>| Check {
        check: "gpu",
        status,
        detail: format!("{detail}; {note}"),
        fix,
    };
    match (refusal, &gpu.driver) {
        (Some(VfioError::Nouveau { .. }), _) | (None, GpuDriver::Nouveau) => line(
            Status::Fail,
            "no passthrough: nouveau cannot be unbound safely".into(),
            Some("blacklist nouveau, update-initramfs -u, reboot".into()),
        ),
        (Some(VfioError::Quarantined { address, since, reason }), _) => line(
            Status::Fail,
            format!("quarantined since {since}: {reason}"),
            Some(format!(
                "check the GPU (dmesg, nvidia-smi -q), then `qudata-agent gpu \
                 release-quarantine {address}`"
            )),
        ),
        (Some(VfioError::InUse { instance, .. }), _) => {
            line(Status::Ok, format!("passed through to instance {instance}"), None)
        }
        (Some(VfioError::IommuOff { .. }), _) => line(
            Status::Warn,
            "no passthrough: the IOMMU is off (Docker only)".into(),
            Some("boot with intel_iommu=on iommu=pt (see grub/), enable VT-d/AMD-Vi".into()),
        ),
        (Some(e), _) => line(
            Status::Warn,
            format!("no passthrough now: {e}"),
            Some("see the reason; doctor shows it again when fixed".into()),
        ),
        (None, GpuDriver::Nvidia | GpuDriver::VfioPci) if reset.is_none() => line(
            Status::Warn,
            "passthrough ready, but no reset the kernel can do safely: the GPU's state is not \
             cleared between tenants"
                .into(),
            Some("a kernel with the bridge's reset_subordinate (6.13+), or a card with FLR".into()),
        ),
        (None, GpuDriver::Nvidia) => line(
            Status::Ok,
            format!(
                "passthrough ready (vfio-pci when a VM starts); between tenants: {}",
                reset.unwrap_or_default()
            ),
            None,
        ),
        (None, GpuDriver::VfioPci) => line(
            Status::Ok,
            format!(
                "passthrough ready (ready for a VM); between tenants: {}",
                reset.unwrap_or_default()
            ),
            None,
        ),
        (None, GpuDriver::None) => line(
            Status::Warn,
            "passthrough ready; usable by VMs, not by Docker".into(),
            Some("install the NVIDIA driver".into()),
        ),
        (None, GpuDriver::Other(name)) => line(
            Status::Warn,
            "passthrough ready; unexpected driver".into(),
            Some(format!("unbind {name}; install the NVIDIA driver")),
        ),
    }
}

/// `0000:65:00.0 10de:2330 on nvidia, iommu group 12 (peers: 0000:65:00.1), slot also .1,
/// 64-bit BARs 131104 MiB`.
fn describe(gpu: &NvidiaGpu) -> String {
    let mut out = format!("{} 10de:{:04x} on {}", gpu.address, gpu.device, gpu.driver);
    match gpu.iommu_group {
        Some(group) => {
            let peers: Vec<&str> = gpu
                .group_devices
                .iter()
                .filter(|d| **d != gpu.address)
                .map(|d| d.as_str())
                .collect();
            let peers = if peers.is_empty() { "none".to_owned() } else { peers.join(" ") };
            out.push_str(&format!(", iommu group {group} (peers: {peers})"));
        }
        None => out.push_str(", no iommu group"),
    }
    if !gpu.slot_functions.is_empty() {
        let functions: Vec<String> =
            gpu.slot_functions.iter().map(|f| format!(".{}", f.address.function())).collect();
        out.push_str(&format!(", slot also {}", functions.join(" ")));
    }
    let mib = gpu.slot_bar64_bytes() >> 20;
    if mib > 0 {
        out.push_str(&format!(", 64-bit BARs {mib} MiB"));
    }
    out
}
