//! The GPU step of recovery: GPUs the agent's bind records say it moved to vfio-pci, and
//! giving one back to its original driver. The one seam to the VFIO layer.

use std::sync::Arc;

use crate::agent::backends;
use crate::config::Config;
use crate::gpu::pci::is_nvidia_gpu;
use crate::vfio::{PciAddress, record};

/// PCI addresses of the GPUs in the bind records. Only GPU functions are listed: the plan
/// matches them against the instance records' `gpus`, which name GPUs, not the audio
/// functions and group peers bound with them (those go back with their GPU).
pub fn bound(cfg: &Config) -> Vec<String> {
    let vfio = backends::vfio(cfg);
    let records = match record::load_all(&vfio.record_dir) {
        Ok(records) => records,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the GPU bind records");
            return Vec::new();
        }
    };
    let is_gpu = |a: &PciAddress| match (vfio.sysfs.vendor(a), vfio.sysfs.class(a)) {
        (Ok(vendor), Ok(class)) => is_nvidia_gpu(vendor, class),
        _ => false,
    };
    let mut out: Vec<String> = records
        .iter()
        .flat_map(|r| &r.devices)
        .filter(|d| is_gpu(&d.address))
        .map(|d| d.address.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Returns `addr`, with every device bound alongside it, to the drivers the bind record
/// names (verified; the record is removed once all are back).
pub async fn give_back(cfg: &Config, addr: &str) -> Result<(), String> {
    let address: PciAddress = addr.parse().map_err(|e| format!("{e}"))?;
    let vfio = Arc::new(backends::vfio(cfg));
    let outcomes =
        vfio.off_runtime(move |v| v.release_holding(&address)).await.map_err(|e| e.to_string())?;
    let failed: Vec<String> = outcomes
        .into_iter()
        .filter_map(|o| o.error.map(|e| format!("{}: {e}", o.address)))
        .collect();
    if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) }
}
