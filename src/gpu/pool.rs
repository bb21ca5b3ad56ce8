//! Which GPUs this host offers: those of `QUDATA_GPU_PCI_ADDRS`, checked against what sysfs
//! shows, or every NVIDIA GPU found.

use super::pci::Inventory;
use crate::config::{ConfigError, SETTINGS};
use crate::vfio::{PciAddress, SysfsRoot};

const VARIABLE: &str = "QUDATA_GPU_PCI_ADDRS";

fn error(variable: &'static str, shown: String, problem: String) -> ConfigError {
    let accepted = SETTINGS.iter().find(|s| s.name == variable).map_or("", |s| s.accepted);
    ConfigError { variable, shown, problem, accepted }
}

/// The GPUs offered to renters, sorted. A listed address that is not an NVIDIA GPU here is a
/// start-up error naming it; so is a sysfs that cannot be read while addresses are listed.
/// With nothing listed and no readable sysfs, the host offers no GPU.
pub fn offered(
    sysfs: &SysfsRoot,
    configured: Option<&[String]>,
) -> Result<Vec<PciAddress>, ConfigError> {
    let listed: Option<Vec<PciAddress>> = match configured {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|a| {
                    a.parse().map_err(|e: crate::vfio::pci::BadPciAddress| {
                        error(VARIABLE, format!("{:?}", list.join(",")), e.to_string())
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let inventory = match Inventory::scan(sysfs, listed.as_deref()) {
        Ok(inventory) => inventory,
        Err(e) if listed.is_some() => {
            let shown = format!("{:?}", sysfs.path().display().to_string());
            return Err(error("QUDATA_SYSFS_ROOT", shown, e.to_string()));
        }
        Err(e) => {
            tracing::warn!(error = %e, "no GPU inventory: this host offers no GPU");
            return Ok(Vec::new());
        }
    };
    if !inventory.rejected.is_empty() {
        let problems: Vec<String> = inventory.rejected.iter().map(ToString::to_string).collect();
        let shown = format!("{:?}", configured.unwrap_or_default().join(","));
        return Err(error(VARIABLE, shown, problems.join("; ")));
    }
    Ok(inventory.gpus.into_iter().map(|g| g.address).collect())
}
