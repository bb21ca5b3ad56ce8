//! NVIDIA GPU inventory from sysfs: which GPUs exist, what they are bound to, their IOMMU
//! group and the other functions of their slot (which go to the guest with them).

use std::fmt;

use crate::vfio::pci::{CLASS_3D, CLASS_VGA, VENDOR_NVIDIA};
use crate::vfio::{PciAddress, SysfsError, SysfsRoot};

/// The inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// sysfs could not be read.
    #[error("cannot take the GPU inventory: {source}")]
    Sysfs {
        #[from]
        source: SysfsError,
    },
}

/// The driver a GPU is bound to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuDriver {
    /// The proprietary driver: usable by Docker, bound to vfio-pci when a VM starts.
    Nvidia,
    /// Ready for a VM.
    VfioPci,
    /// Must be blacklisted: it cannot be unbound safely.
    Nouveau,
    /// Not bound to any driver.
    None,
    Other(String),
}

impl GpuDriver {
    pub fn from_name(name: Option<&str>) -> Self {
        match name {
            None => GpuDriver::None,
            Some("nvidia") => GpuDriver::Nvidia,
            Some("vfio-pci") => GpuDriver::VfioPci,
            Some("nouveau") => GpuDriver::Nouveau,
            Some(other) => GpuDriver::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for GpuDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuDriver::Nvidia => "nvidia",
            GpuDriver::VfioPci => "vfio-pci",
            GpuDriver::Nouveau => "nouveau",
            GpuDriver::None => "none",
            GpuDriver::Other(name) => name,
        })
    }
}

/// One PCI function next to a GPU (same slot), e.g. its HDMI audio function.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PciFunction {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub driver: Option<String>,
    /// Sum of its 64-bit memory BARs (from `resource`).
    pub bar64_bytes: u64,
}

/// One NVIDIA GPU.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NvidiaGpu {
    pub address: PciAddress,
    pub device: u16,
    pub class: u32,
    pub driver: GpuDriver,
    /// `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// Every device of the IOMMU group, the GPU included.
    pub group_devices: Vec<PciAddress>,
    /// The other functions of the GPU's slot, sorted by address.
    pub slot_functions: Vec<PciFunction>,
    /// Sum of the GPU function's 64-bit memory BARs (from `resource`).
    pub bar64_bytes: u64,
}

impl NvidiaGpu {
    /// The 64-bit BARs of the whole slot: what the guest's MMIO window must hold for it.
    pub fn slot_bar64_bytes(&self) -> u64 {
        self.slot_functions
            .iter()
            .fold(self.bar64_bytes, |acc, f| acc.saturating_add(f.bar64_bytes))
    }
}

/// Why an address of `QUDATA_GPU_PCI_ADDRS` is not offered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum RejectReason {
    NoSuchDevice,
    NotNvidiaGpu { vendor: u16, class: u32 },
}

/// An address of `QUDATA_GPU_PCI_ADDRS` that is not an NVIDIA GPU.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    pub address: PciAddress,
    pub reason: RejectReason,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            RejectReason::NoSuchDevice => write!(f, "{}: no such PCI device", self.address),
            RejectReason::NotNvidiaGpu { vendor, class } => write!(
                f,
                "{}: vendor {vendor:04x} class {class:06x} is not an NVIDIA GPU",
                self.address
            ),
        }
    }
}

/// The GPUs of the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inventory {
    pub gpus: Vec<NvidiaGpu>,
    pub rejected: Vec<Rejected>,
}

/// Whether a vendor and class make an NVIDIA GPU (VGA or 3D controller).
pub fn is_nvidia_gpu(vendor: u16, class: u32) -> bool {
    let class16 = (class >> 8) as u16;
    vendor == VENDOR_NVIDIA && (class16 == CLASS_VGA || class16 == CLASS_3D)
}

impl Inventory {
    /// Takes the inventory. `only` (from `QUDATA_GPU_PCI_ADDRS`) limits it to those addresses;
    /// each one that is not an NVIDIA GPU lands in `rejected`.
    pub fn scan(sysfs: &SysfsRoot, only: Option<&[PciAddress]>) -> Result<Inventory, GpuError> {
        let all = sysfs.pci_devices()?;
        let mut inventory = Inventory::default();
        let candidates: Vec<PciAddress> = match only {
            None => all.clone(),
            Some(list) => list.to_vec(),
        };
        for addr in candidates {
            if !all.contains(&addr) {
                let reason = RejectReason::NoSuchDevice;
                inventory.rejected.push(Rejected { address: addr, reason });
                continue;
            }
            let (vendor, class) = (sysfs.vendor(&addr)?, sysfs.class(&addr)?);
            if is_nvidia_gpu(vendor, class) {
                inventory.gpus.push(read_gpu(sysfs, &all, addr, class)?);
            } else if only.is_some() {
                let reason = RejectReason::NotNvidiaGpu { vendor, class };
                inventory.rejected.push(Rejected { address: addr, reason });
            }
        }
        inventory.gpus.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(inventory)
    }
}

fn read_gpu(
    sysfs: &SysfsRoot,
    all: &[PciAddress],
    address: PciAddress,
    class: u32,
) -> Result<NvidiaGpu, GpuError> {
    let iommu_group = sysfs.iommu_group(&address)?;
    let group_devices = match iommu_group {
        Some(group) => sysfs.iommu_group_devices(group)?,
        None => Vec::new(),
    };
    let mut slot_functions = Vec::new();
    for other in all.iter().filter(|a| a.slot() == address.slot() && **a != address) {
        slot_functions.push(PciFunction {
            address: other.clone(),
            vendor: sysfs.vendor(other)?,
            device: sysfs.device_id(other)?,
            class: sysfs.class(other)?,
            driver: sysfs.driver(other)?,
            bar64_bytes: sysfs.bar64_bytes(other)?,
        });
    }
    Ok(NvidiaGpu {
        device: sysfs.device_id(&address)?,
        driver: GpuDriver::from_name(sysfs.driver(&address)?.as_deref()),
        bar64_bytes: sysfs.bar64_bytes(&address)?,
        address,
        class,
        iommu_group,
        group_devices,
        slot_functions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vga_and_3d_controllers_of_nvidia_are_gpus() {
        assert!(is_nvidia_gpu(0x10de, 0x030000));
        assert!(is_nvidia_gpu(0x10de, 0x030200));
        assert!(!is_nvidia_gpu(0x10de, 0x040300), "HDMI audio");
        assert!(!is_nvidia_gpu(0x1002, 0x030000), "AMD");
        assert!(!is_nvidia_gpu(0x10de, 0x068000), "NVSwitch bridge");
    }

    #[test]
    fn rejected_addresses_say_why() {
        let address: PciAddress = "0000:00:1f.0".parse().unwrap();
        let r = Rejected {
            address,
            reason: RejectReason::NotNvidiaGpu { vendor: 0x8086, class: 0x060100 },
        };
        assert_eq!(r.to_string(), "0000:00:1f.0: vendor 8086 class 060100 is not an NVIDIA GPU");
    }
}
