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
use super::quarantine::{Cleared, Entry};
use super::record::{self, BindRecord, BoundDevice};
use super::reset::ResetError;
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
    /// Kept on vfio-pci because its GPU failed its reset and is quarantined.
    pub quarantined: bool,
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
    ///
    /// First each GPU slot of the record is reset on vfio-pci (the next tenant, or the host,
    /// must not find the last one's memory or a wedged engine). A slot whose reset fails or
    /// hangs is quarantined and its functions stay on vfio-pci, out of the record.
    pub fn release(&self, instance: &str) -> Result<Vec<DeviceOutcome>, VfioError> {
        let Some(rec) = record::load(&self.record_dir, instance)? else { return Ok(Vec::new()) };
        let kept = self.reset_slots(instance, &rec)?;
        let mut outcomes = Vec::new();
        for d in &rec.devices {
            let quarantined = kept.contains(&d.address);
            let wanted = if quarantined { Some(VFIO_PCI) } else { d.release_driver() };
            let result = if quarantined {
                Ok(())
            } else {
                self.settle(&d.address, wanted, d.original_override.as_deref())
            };
            outcomes.push(DeviceOutcome {
                instance: instance.to_owned(),
                address: d.address.clone(),
                wanted: wanted.map(str::to_owned),
                driver: self.sysfs.driver(&d.address).ok().flatten(),
                error: result.err().map(|e| e.to_string()),
                quarantined,
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

    /// Resets each GPU slot of a record (functions of a slot that holds a display device).
    /// Returns the devices of slots that failed and were quarantined, which stay on vfio-pci.
    fn reset_slots(&self, instance: &str, rec: &BindRecord) -> Result<Vec<PciAddress>, VfioError> {
        let mut kept = Vec::new();
        for gpu in rec.devices.iter().map(|d| &d.address).filter(|a| self.is_display(a)) {
            let slot: Vec<&BoundDevice> =
                rec.devices.iter().filter(|d| d.address.slot() == gpu.slot()).collect();
            let mut functions: Vec<PciAddress> = slot.iter().map(|d| d.address.clone()).collect();
            functions.sort_by_key(PciAddress::function);
            let started = Instant::now();
            match self.reset_slot(&functions) {
                Ok(done) if done.is_empty() => {}
                Ok(done) => {
                    let millis = started.elapsed().as_millis() as u64;
                    tracing::info!(instance, %gpu, functions = done.len(), millis, "GPU reset and checked");
                }
                Err(ResetError::Unavailable { .. }) => {
                    tracing::warn!(instance, %gpu, "GPU offers no safe reset: it goes back without one");
                }
                Err(ResetError::Failed(cause)) => {
                    let entry = Entry {
                        reason: format!("reset between tenants failed: {cause}"),
                        since: chrono::Utc::now(),
                        kept_on_vfio: slot.iter().map(|d| (*d).clone()).collect(),
                    };
                    self.quarantine.add(gpu, entry)?;
                    kept.extend(functions);
                }
            }
        }
        Ok(kept)
    }

    /// Whether the device is a display controller (a GPU's own function 0).
    fn is_display(&self, address: &PciAddress) -> bool {
        self.sysfs.class(address).is_ok_and(|c| (c >> 16) as u8 == 0x03)
    }

    /// Takes `gpu` out of quarantine: the functions it kept on vfio-pci go back where they
    /// came from (verified), then the entry goes, noting that kernel log lines about it up to
    /// now are old news. Refused while an instance holds it. Blocking.
    pub fn release_quarantine(
        &self,
        gpu: &PciAddress,
        cleared: Cleared,
    ) -> Result<Option<Entry>, VfioError> {
        let Some(entry) = self.quarantine.get(gpu)? else { return Ok(None) };
        for rec in record::load_all(&self.record_dir)? {
            if rec.devices.iter().any(|d| d.address == *gpu) {
                let (address, device, instance) = (gpu.clone(), gpu.clone(), rec.instance);
                return Err(VfioError::InUse { address, device, instance });
            }
        }
        for d in &entry.kept_on_vfio {
            self.settle(&d.address, d.release_driver(), d.original_override.as_deref())?;
        }
        tracing::warn!(gpu = %gpu, reason = %entry.reason, "GPU released from quarantine");
        self.quarantine.remove(gpu, cleared)
    }

    /// Gives each GPU quarantined by a failed reset (its functions still on vfio-pci) another
    /// reset and check; one that passes leaves quarantine. Run at start-up and by `recover`.
    /// Returns the GPUs that came back.
    pub fn retry_quarantined(&self, cleared: &Cleared) -> Result<Vec<PciAddress>, VfioError> {
        let mut back = Vec::new();
        for (gpu, entry) in self.quarantine.load()?.gpus {
            if entry.kept_on_vfio.is_empty() {
                continue; // seen in the kernel log or off the bus: the operator decides
            }
            let mut functions: Vec<PciAddress> =
                entry.kept_on_vfio.iter().map(|d| d.address.clone()).collect();
            functions.sort_by_key(PciAddress::function);
            match self.reset_slot(&functions) {
                Ok(_) => {
                    tracing::info!(%gpu, "quarantined GPU passed a new reset and check");
                    self.release_quarantine(&gpu, cleared.clone())?;
                    back.push(gpu);
                }
                Err(e) => {
                    tracing::warn!(%gpu, error = %e, "quarantined GPU failed its reset again")
                }
            }
        }
        Ok(back)
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
