//! Moving devices between drivers: bind to vfio-pci, release back, reconcile stale records.
//!
//! Every call here blocks (sysfs writes, waits on the `driver` link); async code runs them
//! with [`Vfio::off_runtime`]. Each write has its own deadline ([`super::write`]), each wait
//! the settle deadline.

use std::thread::sleep;
use std::time::{Duration, Instant};

use super::error::VfioError;
use super::pci::PciAddress;
use super::plan::GpuSlot;
use super::record::{self, BindRecord, BoundDevice};
use super::write::write_attr;
use super::{VFIO_PCI, Vfio, host};

/// How often a wait looks at the `driver` link again.
const POLL: Duration = Duration::from_millis(10);

/// Where one device ended after a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceOutcome {
    pub instance: String,
    pub address: PciAddress,
    /// The driver it had to end on (`None`: no driver).
    pub wanted: Option<String>,
    /// The driver it is on now.
    pub driver: Option<String>,
    /// Why it is not where it should be; `None` when it is.
    pub error: Option<String>,
}

impl DeviceOutcome {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

impl Vfio {
    /// Moves every endpoint of the GPUs' IOMMU groups to vfio-pci for `instance` and returns
    /// what the guest gets. Refusals ([`Vfio::plan`]) change nothing; a failure half-way puts
    /// every device back on its original driver before returning the error.
    pub fn bind(&self, instance: &str, gpus: &[PciAddress]) -> Result<Vec<GpuSlot>, VfioError> {
        let plan = self.plan(Some(instance), gpus)?;
        let kept_ids = host::vfio_pci_ids(
            &std::fs::read_to_string(self.proc_root.join("cmdline")).unwrap_or_default(),
        );
        // A second bind for the same instance keeps the first record's originals.
        let mut rec = record::load(&self.record_dir, instance)?
            .unwrap_or_else(|| BindRecord { instance: instance.to_owned(), devices: Vec::new() });
        for d in &plan.devices {
            if rec.devices.iter().all(|b| b.address != d.address) {
                rec.devices.push(BoundDevice {
                    address: d.address.clone(),
                    original_driver: d.driver.clone(),
                    original_override: d.driver_override.clone(),
                    keep_on_vfio: d.driver.as_deref() == Some(VFIO_PCI) || kept_ids.contains(&d.id),
                });
            }
        }
        record::save(&self.record_dir, &rec)?;
        for d in &plan.devices {
            if let Err(cause) = self.settle(&d.address, Some(VFIO_PCI), Some(VFIO_PCI)) {
                tracing::warn!(instance, device = %d.address, error = %cause, "bind failed; rolling back");
                let failed: Vec<String> = self
                    .release(instance)?
                    .into_iter()
                    .filter_map(|o| o.error.map(|e| format!("{}: {e}", o.address)))
                    .collect();
                if failed.is_empty() {
                    return Err(cause);
                }
                let (cause, rollback) = (Box::new(cause), failed.join("; "));
                return Err(VfioError::Incomplete { cause, rollback });
            }
        }
        tracing::info!(instance, devices = plan.devices.len(), "devices bound to vfio-pci");
        Ok(plan.slots)
    }

    /// Puts every device of `instance`'s bind record back where it belongs (its original
    /// driver, or vfio-pci where the host keeps it there), verified; the record is removed
    /// once every device is. Without a record there is nothing to do. Every device is tried
    /// even when one fails; the outcomes say which.
    pub fn release(&self, instance: &str) -> Result<Vec<DeviceOutcome>, VfioError> {
        let Some(rec) = record::load(&self.record_dir, instance)? else { return Ok(Vec::new()) };
        let mut outcomes = Vec::new();
        for d in &rec.devices {
            let wanted = d.release_driver();
            let result = self.settle(&d.address, wanted, d.original_override.as_deref());
            outcomes.push(DeviceOutcome {
                instance: instance.to_owned(),
                address: d.address.clone(),
                wanted: wanted.map(str::to_owned),
                driver: self.sysfs.driver(&d.address).ok().flatten(),
                error: result.err().map(|e| e.to_string()),
            });
        }
        if outcomes.iter().all(DeviceOutcome::is_ok) {
            record::remove(&self.record_dir, instance)?;
            tracing::info!(instance, devices = outcomes.len(), "devices released");
        } else {
            tracing::error!(instance, ?outcomes, "release incomplete; the bind record stays");
        }
        Ok(outcomes)
    }

    /// Releases every bind record whose instance is not in `in_use` (instance ids whose VM
    /// still runs and keeps its devices). Run at start-up, before the API serves, and by
    /// `recover`: a record left by a crash (even between two writes of a bind) is undone.
    /// Returns the outcome of every device of every released record.
    pub fn reconcile(&self, in_use: &[String]) -> Result<Vec<DeviceOutcome>, VfioError> {
        let mut outcomes = Vec::new();
        for rec in record::load_all(&self.record_dir)? {
            if in_use.contains(&rec.instance) {
                continue;
            }
            tracing::warn!(instance = %rec.instance, "stale bind record: releasing its devices");
            outcomes.extend(self.release(&rec.instance)?);
        }
        Ok(outcomes)
    }

    /// Brings one device to `target` (`None`: no driver) and leaves `driver_override` as
    /// `final_override`: override → unbind → drivers_probe, each verified on the `driver`
    /// link. Already there: only the override is set.
    fn settle(
        &self,
        address: &PciAddress,
        target: Option<&str>,
        final_override: Option<&str>,
    ) -> Result<(), VfioError> {
        let dev = self.sysfs.device_dir(address);
        let timeout = self.timeouts.write;
        let current = self.sysfs.driver(address)?;
        if current.as_deref() != target {
            // The override makes drivers_probe pick `target` and keeps any other driver off.
            write_attr(&dev.join("driver_override"), target.unwrap_or("\n"), timeout)?;
            if current.is_some() {
                write_attr(&dev.join("driver/unbind"), address.as_str(), timeout)?;
                self.wait_driver(address, None)?;
            }
            if target.is_some() {
                let probe = self.sysfs.join("bus/pci/drivers_probe");
                write_attr(&probe, address.as_str(), timeout)?;
                self.wait_driver(address, target)?;
            }
        }
        if self.sysfs.driver_override(address)?.as_deref() != final_override {
            write_attr(&dev.join("driver_override"), final_override.unwrap_or("\n"), timeout)?;
        }
        Ok(())
    }

    /// Waits until the device's `driver` link names `want`.
    fn wait_driver(&self, address: &PciAddress, want: Option<&str>) -> Result<(), VfioError> {
        let deadline = Instant::now() + self.timeouts.settle;
        loop {
            let now = self.sysfs.driver(address)?;
            if now.as_deref() == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VfioError::Settle {
                    address: address.clone(),
                    want: want.unwrap_or("no driver").to_owned(),
                    found: now.unwrap_or_else(|| "none".to_owned()),
                    millis: self.timeouts.settle.as_millis(),
                });
            }
            sleep(POLL);
        }
    }
}
