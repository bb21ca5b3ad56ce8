//! VFIO: everything the agent does with PCI devices through sysfs.
//!
//! All sysfs access goes through [`SysfsRoot`], and `/proc` through [`Vfio::proc_root`], so the
//! whole layer runs against temporary trees in tests (DESIGN.md, "VFIO"). A bind writes a
//! [`record::BindRecord`] first, then moves each device with `driver_override` → `unbind` →
//! `drivers_probe`; [`Vfio::release`] undoes it and [`Vfio::reconcile`] undoes what a crash
//! left behind. Before a GPU goes back it is reset ([`reset`]); one that fails is quarantined
//! ([`quarantine`]) and not offered again until it is checked.

pub mod bind;
pub mod error;
pub mod host;
pub mod pci;
pub mod plan;
pub mod quarantine;
pub mod record;
pub mod reset;
pub mod resource;
pub mod sysfs;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use bind::DeviceOutcome;
pub use error::VfioError;
pub use pci::PciAddress;
pub use plan::{BindPlan, GpuSlot};
pub use quarantine::Quarantine;
pub use sysfs::{SysfsError, SysfsRoot};

/// The driver name of VFIO's PCI driver.
pub const VFIO_PCI: &str = "vfio-pci";

/// Deadlines of the sysfs side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// One sysfs write (a hung driver can block it for ever).
    pub write: Duration,
    /// A `driver` link reaching the wanted driver after unbind or probe.
    pub settle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // A real unbind or probe returns in well under a second; a GPU's reset on unbind
        // can take a few. Past these, the device is not coming.
        Timeouts { write: Duration::from_secs(15), settle: Duration::from_secs(20) }
    }
}

/// The VFIO side of one host: where sysfs and `/proc` are, and where bind records live.
#[derive(Clone, Debug)]
pub struct Vfio {
    pub sysfs: SysfsRoot,
    /// `/proc`: holders of `/dev/nvidia*`, NVIDIA minors, the kernel command line.
    pub proc_root: PathBuf,
    /// `<data dir>/vfio`: one bind record per instance.
    pub record_dir: PathBuf,
    /// GPUs not offered, and why (`<data dir>/gpu-quarantine.json`).
    pub quarantine: Quarantine,
    pub timeouts: Timeouts,
}

impl Vfio {
    /// The production layout: records under `<data_dir>/vfio`, `/proc`, default deadlines.
    pub fn new(sysfs: SysfsRoot, data_dir: &Path) -> Vfio {
        Vfio {
            sysfs,
            proc_root: "/proc".into(),
            record_dir: record_dir(data_dir),
            quarantine: Quarantine::new(data_dir),
            timeouts: Timeouts::default(),
        }
    }

    /// Runs a blocking VFIO call on Tokio's blocking pool, off the async workers.
    pub async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        call: impl FnOnce(&Vfio) -> T + Send + 'static,
    ) -> T {
        let vfio = Arc::clone(self);
        tokio::task::spawn_blocking(move || call(&vfio)).await.expect("VFIO task panicked")
    }
}

/// Where bind records live under a data dir.
pub fn record_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("vfio")
}
