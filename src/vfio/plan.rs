//! Before any change: which devices a bind moves, and every reason to refuse it. Reads only.

use std::collections::BTreeSet;

use super::error::VfioError;
use super::host::{self, Holder};
use super::pci::{CLASS_AUDIO, CLASS_BASE_BRIDGE, PciAddress};
use super::{VFIO_PCI, Vfio, record};

/// One GPU as the guest gets it: every function of its slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuSlot {
    pub gpu: PciAddress,
    /// Every function of the slot, function 0 first.
    pub functions: Vec<PciAddress>,
    /// Sum of the 64-bit memory BARs of those functions.
    pub bar64_bytes: u64,
}

/// One device a bind moves to vfio-pci, as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedDevice {
    pub address: PciAddress,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    /// `vendor:device`, lowercase hex, as `vfio-pci.ids` lists it.
    pub id: String,
}

/// What a bind of a set of GPUs does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindPlan {
    /// Every endpoint of the GPUs' IOMMU groups (bridges excluded), sorted.
    pub devices: Vec<PlannedDevice>,
    pub slots: Vec<GpuSlot>,
}

impl Vfio {
    /// Checks that `gpus` can go to instance `instance` (`None`: a new one) and lists what the
    /// bind will move. Changes nothing.
    pub fn plan(&self, instance: Option<&str>, gpus: &[PciAddress]) -> Result<BindPlan, VfioError> {
        let sysfs = &self.sysfs;
        let all = sysfs.pci_devices()?;
        let mut slots = Vec::new();
        for gpu in gpus {
            if !all.contains(gpu) {
                return Err(VfioError::NotFound { address: gpu.clone() });
            }
            if let Some(entry) = self.quarantine.get(gpu)? {
                let (address, reason) = (gpu.clone(), entry.reason);
                let since = entry.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                return Err(VfioError::Quarantined { address, since, reason });
            }
            if sysfs.driver(gpu)?.as_deref() == Some("nouveau") {
                return Err(VfioError::Nouveau { address: gpu.clone() });
            }
            let functions: Vec<PciAddress> =
                all.iter().filter(|a| a.slot() == gpu.slot()).cloned().collect();
            self.check_own_functions(gpu, &functions)?;
            let mut bar64_bytes = 0u64;
            for f in &functions {
                bar64_bytes = bar64_bytes.saturating_add(sysfs.bar64_bytes(f)?);
            }
            slots.push(GpuSlot { gpu: gpu.clone(), functions, bar64_bytes });
        }
        let ours: BTreeSet<&PciAddress> = slots.iter().flat_map(|s| &s.functions).collect();
        let mut members = BTreeSet::new();
        for slot in &slots {
            for function in &slot.functions {
                let group = sysfs
                    .iommu_group(function)?
                    .ok_or_else(|| VfioError::IommuOff { address: slot.gpu.clone() })?;
                for member in sysfs.iommu_group_devices(group)? {
                    members.insert((slot.gpu.clone(), member));
                }
            }
        }
        let mut devices = Vec::new();
        for (gpu, address) in members {
            if devices.iter().any(|d: &PlannedDevice| d.address == address)
                || (sysfs.class(&address)? >> 16) as u8 == CLASS_BASE_BRIDGE
            {
                continue;
            }
            let driver = sysfs.driver(&address)?;
            // A device outside the GPUs' slots may come along only if no driver uses it.
            if !ours.contains(&address)
                && let Some(other) = driver.as_deref().filter(|d| *d != VFIO_PCI)
            {
                let (device, driver) = (address, other.to_owned());
                return Err(VfioError::SharedGroup { address: gpu, device, driver });
            }
            self.check_not_held(instance, &gpu, &address)?;
            let id = format!("{:04x}:{:04x}", sysfs.vendor(&address)?, sysfs.device_id(&address)?);
            let driver_override = sysfs.driver_override(&address)?;
            devices.push(PlannedDevice { address, driver, driver_override, id });
        }
        if !slots.is_empty() && !sysfs.join("bus/pci/drivers").join(VFIO_PCI).is_dir() {
            return Err(VfioError::NoVfioDriver);
        }
        self.check_no_holders(&slots)?;
        Ok(BindPlan { devices, slots })
    }

    /// Refuses a slot with a function that is not part of the GPU (another vendor, or a class
    /// a GPU card does not have) while a host driver uses it: a NIC or a disk controller that
    /// a board maker put in the GPU's slot must never be taken from the host.
    fn check_own_functions(
        &self,
        gpu: &PciAddress,
        functions: &[PciAddress],
    ) -> Result<(), VfioError> {
        let vendor = self.sysfs.vendor(gpu)?;
        for function in functions.iter().filter(|f| *f != gpu) {
            let (their_vendor, class) = (self.sysfs.vendor(function)?, self.sysfs.class(function)?);
            if their_vendor == vendor && is_gpu_card_class(class) {
                continue;
            }
            if let Some(driver) = self.sysfs.driver(function)?.filter(|d| d != VFIO_PCI) {
                let what = format!("vendor {their_vendor:04x}, class {class:06x}");
                let (address, device) = (gpu.clone(), function.clone());
                return Err(VfioError::ForeignFunction { address, device, what, driver });
            }
        }
        Ok(())
    }

    /// Refuses a device another instance's bind record holds.
    fn check_not_held(
        &self,
        instance: Option<&str>,
        gpu: &PciAddress,
        device: &PciAddress,
    ) -> Result<(), VfioError> {
        for other in record::load_all(&self.record_dir)? {
            if Some(other.instance.as_str()) != instance
                && other.devices.iter().any(|d| d.address == *device)
            {
                let (address, device) = (gpu.clone(), device.clone());
                return Err(VfioError::InUse { address, device, instance: other.instance });
            }
        }
        Ok(())
    }

    /// Refuses GPUs on the NVIDIA driver whose device node a process holds: unbinding would
    /// block until they let go.
    fn check_no_holders(&self, slots: &[GpuSlot]) -> Result<(), VfioError> {
        for slot in slots {
            if self.sysfs.driver(&slot.gpu)?.as_deref() != Some("nvidia") {
                continue;
            }
            let minor = host::nvidia_minor(&self.proc_root, &slot.gpu);
            let found = host::holders(&self.proc_root, |node| host::is_gpu_node(node, minor));
            if !found.is_empty() {
                let holders: Vec<String> = found.iter().map(Holder::to_string).collect();
                let holders = holders.join(", ");
                return Err(VfioError::Busy { address: slot.gpu.clone(), holders });
            }
        }
        Ok(())
    }
}

/// Classes a GPU card's own functions have: display (the GPU), HD audio, USB and serial bus
/// (the USB-C controller of workstation cards).
fn is_gpu_card_class(class: u32) -> bool {
    let (base, sub) = ((class >> 16) as u8, (class >> 8) as u16);
    const BASE_DISPLAY: u8 = 0x03;
    const USB: u16 = 0x0c03;
    const SERIAL_BUS_OTHER: u16 = 0x0c80;
    base == BASE_DISPLAY || sub == CLASS_AUDIO || sub == USB || sub == SERIAL_BUS_OTHER
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_gpu_card_has_display_audio_usb_and_serial_bus_functions_only() {
        use super::is_gpu_card_class as card;
        assert!(card(0x030000) && card(0x030200) && card(0x040300));
        assert!(card(0x0c0330) && card(0x0c8000));
        assert!(!card(0x020000), "ethernet");
        assert!(!card(0x010802), "NVMe");
        assert!(!card(0x040100), "a sound card that is not HD audio");
    }
}
