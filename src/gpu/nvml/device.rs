//! Everything NVML says about one GPU, for the self-test: facts (name, memory, PCIe link, ECC,
//! power limit) and the memory health the agent also watches.

use nvml_wrapper::error::NvmlError as Raw;
use serde::{Deserialize, Serialize};

use super::{MIB, Nvml, NvmlError};
use crate::vfio::PciAddress;

/// The PCIe link as the GPU reports it; a value it does not report is left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcieLink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_current: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width_current: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width_max: Option<u32>,
}

impl PcieLink {
    pub fn is_empty(&self) -> bool {
        *self == PcieLink::default()
    }
}

/// Memory faults the driver knows of; `None` where the GPU does not report the counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHealth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_pages_pending: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_remap_pending: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_remap_failure: Option<bool>,
}

impl MemoryHealth {
    /// What is wrong, one phrase each; empty when nothing is (or nothing is reported).
    pub fn problems(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.retired_pages_pending == Some(true) {
            out.push("memory pages are waiting to be retired (a GPU reset retires them)");
        }
        if self.row_remap_failure == Some(true) {
            out.push("a row remapping failed (uncorrectable memory)");
        } else if self.row_remap_pending == Some(true) {
            out.push("memory rows are waiting to be remapped (a GPU reset remaps them)");
        }
        out
    }
}

/// One GPU the driver owns.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceFacts {
    /// Function 0 of its slot, as sysfs names it.
    pub address: PciAddress,
    pub name: String,
    pub memory_total_mib: u64,
    pub pcie: PcieLink,
    /// The current ECC mode (a pending change shows after the next reboot).
    pub ecc_enabled: Option<bool>,
    /// The enforced power limit (the lowest of every limit set), W.
    pub power_limit_w: Option<f64>,
    pub memory: MemoryHealth,
}

impl Nvml {
    /// Every GPU the driver owns, in NVML's order; a GPU that cannot be opened, placed on the
    /// bus, named or sized is an error of its own (a lost GPU), the others are still read.
    pub fn devices(&self) -> Result<Vec<Result<DeviceFacts, NvmlError>>, NvmlError> {
        Ok((0..self.count()?).map(|index| self.device(index)).collect())
    }

    fn device(&self, index: u32) -> Result<DeviceFacts, NvmlError> {
        let failed =
            |action: &'static str| move |source: Raw| NvmlError::Device { index, action, source };
        let device = self.inner.device_by_index(index).map_err(failed("open it"))?;
        let pci = device.pci_info().map_err(failed("read its PCI address"))?;
        let address = address_of(&pci).ok_or(NvmlError::Address {
            index,
            domain: pci.domain,
            bus: pci.bus,
            device: pci.device,
        })?;
        let name = device.name().map_err(failed("read its name"))?;
        let memory = device.memory_info().map_err(failed("read its memory size"))?;
        Ok(DeviceFacts {
            address,
            name,
            memory_total_mib: memory.total / MIB,
            pcie: PcieLink {
                gen_current: device.current_pcie_link_gen().ok(),
                gen_max: device.max_pcie_link_gen().ok(),
                width_current: device.current_pcie_link_width().ok(),
                width_max: device.max_pcie_link_width().ok(),
            },
            ecc_enabled: device.is_ecc_enabled().ok().map(|e| e.currently_enabled),
            power_limit_w: device.enforced_power_limit().ok().map(|mw| f64::from(mw) / 1000.0),
            memory: self.memory_health(&device),
        })
    }

    pub(super) fn memory_health(&self, device: &nvml_wrapper::Device<'_>) -> MemoryHealth {
        let remap = self.remapped_rows(device);
        MemoryHealth {
            retired_pages_pending: device.are_pages_pending_retired().ok(),
            row_remap_pending: remap.map(|(pending, _)| pending),
            row_remap_failure: remap.map(|(_, failed)| failed),
        }
    }
}

/// Function 0 of the GPU's slot (`0000:65:00.0`), the name sysfs and the kernel log use.
pub(super) fn address_of(
    pci: &nvml_wrapper::struct_wrappers::device::PciInfo,
) -> Option<PciAddress> {
    format!("{:04x}:{:02x}:{:02x}.0", pci.domain, pci.bus, pci.device).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_remapping_outranks_a_pending_one() {
        let all = MemoryHealth {
            retired_pages_pending: Some(true),
            row_remap_pending: Some(true),
            row_remap_failure: Some(true),
        };
        assert_eq!(
            all.problems(),
            [
                "memory pages are waiting to be retired (a GPU reset retires them)",
                "a row remapping failed (uncorrectable memory)"
            ]
        );
        let pending = MemoryHealth { row_remap_pending: Some(true), ..Default::default() };
        assert_eq!(pending.problems().len(), 1);
        assert!(pending.problems()[0].contains("waiting to be remapped"));
        assert!(MemoryHealth::default().problems().is_empty(), "unreported is not judged");
    }
}
