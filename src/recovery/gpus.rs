//! The GPU step of recovery: the devices the agent's bind records say it moved to vfio-pci,
//! and giving an instance's devices back to their original drivers (through `crate::vfio`,
//! whose records are written before the first sysfs write, so any crash can be undone).

use std::sync::Arc;

use super::plan::{Action, Row, Subject};
use crate::config::Config;
use crate::gpu::pci::is_nvidia_gpu;
use crate::vfio::quarantine::Cleared;
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

/// GPUs quarantined by a failed reset get another reset and check (off the async workers);
/// a row for each that passed and went back to its drivers.
pub async fn retry_quarantined(cfg: &Config) -> Vec<Row> {
    let vfio = Arc::new(Vfio::new(SysfsRoot::new(&cfg.sysfs_root), &cfg.data_dir));
    let back = vfio
        .off_runtime(|v| v.retry_quarantined(&Cleared::now(&v.proc_root)))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot retry the quarantined GPUs");
            Vec::new()
        });
    back.into_iter()
        .map(|gpu| Row {
            subject: Subject::Gpu,
            name: gpu.to_string(),
            action: Action::Returned,
            why: "it passed a new reset and check after its quarantine".into(),
            failed: None,
        })
        .collect()
}

/// One row per quarantined GPU: it stays out of service until checked.
pub fn quarantined_rows(cfg: &Config) -> Vec<Row> {
    let quarantine = crate::vfio::Quarantine::new(&cfg.data_dir);
    let gpus = match quarantine.load() {
        Ok(state) => state.gpus,
        Err(e) => {
            let why = "the GPU quarantine cannot be read".to_owned();
            let name = quarantine.path().display().to_string();
            let failed = Some(e.to_string());
            return vec![Row {
                subject: Subject::Gpu,
                name,
                action: Action::Quarantined,
                why,
                failed,
            }];
        }
    };
    gpus.into_iter()
        .map(|(gpu, entry)| Row {
            subject: Subject::Gpu,
            name: gpu.to_string(),
            action: Action::Quarantined,
            why: format!(
                "since {}: {}; `qudata-agent gpu release-quarantine {gpu}` once checked",
                entry.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                entry.reason
            ),
            failed: None,
        })
        .collect()
}
