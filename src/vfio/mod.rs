//! VFIO: everything the agent does with PCI devices through sysfs.
//!
//! All sysfs access goes through [`SysfsRoot`], so the whole layer runs against a temporary
//! tree in tests (DESIGN.md, "VFIO").

pub mod pci;
pub mod sysfs;

pub use pci::PciAddress;
pub use sysfs::{SysfsError, SysfsRoot};
