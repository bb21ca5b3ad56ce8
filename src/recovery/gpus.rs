//! The GPU step of recovery: GPUs the agent's bind record says it moved to vfio-pci, and
//! giving one back to its original driver.
//!
//! The one seam to the VFIO layer (bind record, reconcile): until that layer exists in this
//! build there is no bind record, so nothing is listed and nothing is returned.

use crate::config::Config;

/// PCI addresses in the agent's bind record.
pub fn bound(_cfg: &Config) -> Vec<String> {
    Vec::new()
}

/// Returns `addr` to the driver the bind record names.
pub async fn give_back(_cfg: &Config, addr: &str) -> Result<(), String> {
    Err(format!("{addr}: this build cannot return GPUs from vfio-pci yet"))
}
