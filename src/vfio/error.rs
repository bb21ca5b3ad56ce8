//! Why a bind, release or reconcile did not happen. Each refusal is one sentence that says what
//! to do; refusals are found before the first change, so nothing was touched.

use std::path::PathBuf;

use super::pci::PciAddress;
use super::sysfs::SysfsError;
use crate::fsutil::FsError;

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// Processes hold the GPU's device node: unbinding the NVIDIA driver would hang.
    #[error(
        "GPU {address} is in use on the host by {holders}; stop those processes (or \
         nvidia-persistenced) and try again"
    )]
    Busy { address: PciAddress, holders: String },
    /// A function of the GPU's slot is another kind of device that a host driver uses.
    #[error(
        "{device} sits in the slot of GPU {address} but is not part of the GPU ({what} on the \
         {driver} driver), and it is never taken from the host; offer another GPU"
    )]
    ForeignFunction { address: PciAddress, device: PciAddress, what: String, driver: String },
    /// A bind failed half-way and the rollback did not finish either.
    #[error("{cause}; rolling back also failed: {rollback}; run `qudata-agent recover`")]
    Incomplete { cause: Box<VfioError>, rollback: String },
    /// A device of the GPU's IOMMU group is given to another instance.
    #[error("{device} (IOMMU group of GPU {address}) is held by instance {instance}")]
    InUse { address: PciAddress, device: PciAddress, instance: String },
    /// The kernel made no IOMMU groups: VFIO cannot work.
    #[error(
        "the IOMMU is off (no IOMMU groups for {address}); boot with intel_iommu=on or \
         amd_iommu=on and enable VT-d/AMD-Vi in the firmware"
    )]
    IommuOff { address: PciAddress },
    /// The GPU is on nouveau, which does not survive an unbind.
    #[error(
        "GPU {address} is on the nouveau driver, which cannot be unbound safely; blacklist \
         nouveau and reboot"
    )]
    Nouveau { address: PciAddress },
    /// The vfio-pci driver is not loaded: nothing could take the devices.
    #[error(
        "the vfio-pci driver is not loaded; run `modprobe vfio-pci` (install.sh loads it at boot)"
    )]
    NoVfioDriver,
    /// No such PCI device.
    #[error("GPU {address} does not exist on this host; check QUDATA_GPU_PCI_ADDRS")]
    NotFound { address: PciAddress },
    /// The config space reads all ones: the device fell off the bus.
    #[error(
        "{address} reads all ones in its config space: it fell off the bus or did not come out of reset"
    )]
    OffTheBus { address: PciAddress },
    /// The GPU is quarantined and not offered.
    #[error(
        "GPU {address} is quarantined since {since}: {reason}; check it, then run \
         `qudata-agent gpu release-quarantine {address}`"
    )]
    Quarantined { address: PciAddress, since: String, reason: String },
    /// A bind record could not be read, written or removed.
    #[error("bind record: {0}")]
    Record(#[from] FsError),
    /// A bind record holds something else than a record.
    #[error("bind record {path} is corrupt ({reason}); fix or remove it after checking the GPUs")]
    RecordCorrupt { path: PathBuf, reason: String },
    /// The `driver` link did not reach the wanted driver before the deadline.
    #[error("{address} did not move to {want} within {millis} ms (driver now: {found})")]
    Settle { address: PciAddress, want: String, found: String, millis: u128 },
    /// Another driver (not vfio-pci) uses a device of the GPU's IOMMU group.
    #[error(
        "{device} shares the IOMMU group of GPU {address} and is used by the {driver} driver; \
         the group can only be passed through whole: pick another GPU or move the device"
    )]
    SharedGroup { address: PciAddress, device: PciAddress, driver: String },
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The device disappeared from sysfs.
    #[error("{address} is gone from the PCI bus (no longer in sysfs)")]
    Vanished { address: PciAddress },
    /// A sysfs write returned an error.
    #[error("writing {value:?} to {path} failed: {source}")]
    Write { path: PathBuf, value: String, source: std::io::Error },
    /// The config space answers with another vendor id than the device's.
    #[error("{address} answers with vendor id {found} after a reset, not its own")]
    WrongVendor { address: PciAddress, found: String },
    /// A sysfs write did not return before its deadline (bad hardware or a hung driver).
    #[error(
        "writing {value:?} to {path} did not return within {millis} ms; the device may be hung"
    )]
    WriteTimeout { path: PathBuf, value: String, millis: u128 },
}
