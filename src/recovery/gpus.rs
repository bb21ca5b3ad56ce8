//! The GPU step of recovery: the devices the agent's bind records say it moved to vfio-pci,
//! and giving an instance's devices back to their original drivers (through `crate::vfio`,
//! whose records are written before the first sysfs write, so any crash can be undone).

use std::sync::Arc;

use crate::config::Config;
use crate::gpu::pci::is_nvidia_gpu;
use crate::vfio::{PciAddress, SysfsRoot, Vfio, record};

/// One device in a bind record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundGpu {
    /// The instance the record belongs to.
    pub instance: String,
    /// Its PCI address.
    pub address: String,
}

/// The GPUs in the agent's bind records (their audio functions and group peers, bound with
/// them, go back with them and are not listed). A record that cannot be read is logged and
/// left alone (it may be the only note of a GPU's driver): never guessed at.
pub fn bound(cfg: &Config) -> Vec<BoundGpu> {
    let sysfs = SysfsRoot::new(&cfg.sysfs_root);
    let is_gpu = |a: &PciAddress| match (sysfs.vendor(a), sysfs.class(a)) {
        (Ok(vendor), Ok(class)) => is_nvidia_gpu(vendor, class),
        _ => false,
    };
    match record::load_all(&crate::vfio::record_dir(&cfg.data_dir)) {
        Ok(records) => records
            .iter()
            .flat_map(|r| {
                let gpus = r.devices.iter().filter(|d| is_gpu(&d.address));
                gpus.map(|d| BoundGpu {
                    instance: r.instance.clone(),
                    address: d.address.to_string(),
                })
            })
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the GPU bind records; no GPU is returned");
            Vec::new()
        }
    }
}

/// Gives `instance`'s devices back (sysfs writes off the async workers, each with its
/// deadline). `Ok`: each device's address and why it is not back, if it is not.
pub async fn release(
    cfg: &Config,
    instance: &str,
) -> Result<Vec<(String, Option<String>)>, String> {
    let vfio = Arc::new(Vfio::new(SysfsRoot::new(&cfg.sysfs_root), &cfg.data_dir));
    let instance = instance.to_owned();
    let outcomes =
        vfio.off_runtime(move |v| v.release(&instance)).await.map_err(|e| e.to_string())?;
    Ok(outcomes.into_iter().map(|o| (o.address.to_string(), o.error)).collect())
}
