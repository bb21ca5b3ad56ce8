//! GPUs of the host: the PCI inventory (from sysfs). NVML and self-test facts join later.

pub mod pci;
pub mod pool;

pub use pci::{GpuDriver, GpuError, Inventory, NvidiaGpu, PciFunction, RejectReason, Rejected};
