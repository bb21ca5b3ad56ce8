//! Resetting a GPU between tenants, and checking that it answers afterwards.
//!
//! The reset runs while every function is still on vfio-pci (no host driver has state in it
//! then) through the kernel's own `reset` attribute, which tries the methods `reset_method`
//! lists in the kernel's order: a function-level reset first, a bus reset only when the kernel
//! finds the device alone below its bridge (it refuses a bus reset that would hit a
//! neighbour). A slot whose functions offer no method at all (a multi-function card without
//! FLR) is reset through its bridge's `reset_subordinate`, and only when everything below that
//! bridge is this slot. Each write has the sysfs write deadline: a reset that hangs is a
//! failure like one that returns an error.

use std::io::Read;
use std::path::Path;

use super::error::VfioError;
use super::pci::PciAddress;
use super::write::write_attr;
use super::{VFIO_PCI, Vfio};

/// How one function of a slot was reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionReset {
    pub address: PciAddress,
    /// The methods the kernel offered (`reset_method`), or `bridge` for a secondary bus reset.
    pub methods: String,
}

/// Why a slot was not reset; only [`ResetError::Failed`] means the GPU is suspect.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The reset or the check after it failed: the GPU must not go to another tenant.
    #[error("{0}")]
    Failed(VfioError),
    /// Neither the functions nor a bridge that serves only them offer a reset.
    #[error(
        "GPU {address} offers no reset the kernel can do safely (no reset method, and its \
         bridge serves other devices or cannot reset); its state is not cleared between tenants"
    )]
    Unavailable { address: PciAddress },
}

impl Vfio {
    /// Resets every function of one GPU slot (function 0 first) that is on vfio-pci, then
    /// checks each one answers with its own vendor id. Blocking: writes with deadlines.
    pub fn reset_slot(&self, functions: &[PciAddress]) -> Result<Vec<FunctionReset>, ResetError> {
        let Some(gpu) = functions.first() else { return Ok(Vec::new()) };
        let ours: Vec<&PciAddress> = functions
            .iter()
            .filter(|f| self.sysfs.driver(f).ok().flatten().as_deref() == Some(VFIO_PCI))
            .collect();
        if ours.is_empty() {
            return Ok(Vec::new());
        }
        let timeout = self.timeouts.write;
        let mut done = Vec::new();
        for function in &ours {
            let dir = self.sysfs.device_dir(function);
            if !dir.join("reset").exists() {
                continue;
            }
            let methods = self.sysfs.read_attr(&dir.join("reset_method")).unwrap_or_default();
            write_attr(&dir.join("reset"), "1", timeout).map_err(ResetError::Failed)?;
            done.push(FunctionReset { address: (*function).clone(), methods });
        }
        if done.is_empty() {
            let bridge = self
                .sole_bridge(functions)
                .ok_or_else(|| ResetError::Unavailable { address: gpu.clone() })?;
            write_attr(&bridge, "1", timeout).map_err(ResetError::Failed)?;
            done.push(FunctionReset { address: gpu.clone(), methods: "bridge".into() });
        }
        for function in &ours {
            self.check_alive(function).map_err(ResetError::Failed)?;
        }
        Ok(done)
    }

    /// How a slot would be reset between tenants: `function reset (flr bus)` with the
    /// methods the kernel offers, `bridge reset`, or `None` when it cannot be. Reads only.
    pub fn reset_kind(&self, functions: &[PciAddress]) -> Option<String> {
        let gpu = functions.first()?;
        let dir = self.sysfs.device_dir(gpu);
        if dir.join("reset").exists() {
            let methods = self.sysfs.read_attr(&dir.join("reset_method")).unwrap_or_default();
            return Some(format!(
                "function reset ({})",
                if methods.is_empty() { "kernel's choice" } else { methods.as_str() }
            ));
        }
        self.sole_bridge(functions).map(|_| "bridge reset".to_owned())
    }

    /// The `reset_subordinate` of the bridge above `functions`, when every device below it is
    /// one of them.
    fn sole_bridge(&self, functions: &[PciAddress]) -> Option<std::path::PathBuf> {
        let real = std::fs::canonicalize(self.sysfs.device_dir(functions.first()?)).ok()?;
        let bridge = real.parent()?;
        bridge.file_name()?.to_str()?.parse::<PciAddress>().ok()?;
        let attr = bridge.join("reset_subordinate");
        let below: Vec<PciAddress> = std::fs::read_dir(bridge)
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        (attr.exists() && below.iter().all(|d| functions.contains(d))).then_some(attr)
    }

    /// The function is there and its config space answers with its vendor id: all ones is a
    /// device that fell off the bus (or never came out of reset).
    pub fn check_alive(&self, function: &PciAddress) -> Result<(), VfioError> {
        if !self.sysfs.device_exists(function) {
            return Err(VfioError::Vanished { address: function.clone() });
        }
        let config = self.sysfs.device_dir(function).join("config");
        let head = read_head(&config)
            .map_err(|source| VfioError::Sysfs(super::SysfsError::Read { path: config, source }))?;
        let vendor = u16::from_le_bytes([head[0], head[1]]);
        if vendor == 0xffff {
            return Err(VfioError::OffTheBus { address: function.clone() });
        }
        let expected = self.sysfs.vendor(function)?;
        if vendor != expected {
            let found = format!("{vendor:04x}");
            return Err(VfioError::WrongVendor { address: function.clone(), found });
        }
        Ok(())
    }
}

/// The first four bytes of a config space (vendor and device id).
fn read_head(path: &Path) -> std::io::Result<[u8; 4]> {
    let mut head = [0u8; 4];
    std::fs::File::open(path)?.read_exact(&mut head)?;
    Ok(head)
}
