//! GPUs of the host: the PCI inventory (sysfs), NVML facts and metrics (driver loaded at run
//! time), the inventory file `qudata-agent selftest` writes, and the one place that
//! decides where `/init/host` facts and `/stats` metrics come from.

pub mod facts;
pub mod health;
pub mod host;
pub mod kmsg;
pub mod metrics;
pub mod models;
pub mod nvml;
pub mod pci;
pub mod pool;
pub mod selftest;

pub use host::HostNvml;
pub use metrics::{GpuMetrics, GpuTelemetry};
pub use nvml::{Nvml, NvmlError};
pub use pci::{GpuDriver, GpuError, Inventory, NvidiaGpu, PciFunction, RejectReason, Rejected};

/// The GPU part of `/init/host` (PROTOCOL.md §1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuFacts {
    /// Marketing name as NVML or `nvidia-smi` gives it (`"NVIDIA H100 80GB HBM3"`).
    pub name: String,
    pub count: u32,
    /// GiB per GPU.
    pub vram_gib: f64,
    /// Highest CUDA version the driver supports (`12.4`); 0 when unknown.
    pub max_cuda: f64,
}

impl GpuFacts {
    /// Names of the fields that are unknown (sent as `""`/`0`).
    pub fn unknown(&self) -> Vec<&'static str> {
        let checks = [
            ("gpu_name", self.name.is_empty()),
            ("gpu_amount", self.count == 0),
            ("vram", self.vram_gib <= 0.0),
            ("max_cuda", self.max_cuda <= 0.0),
        ];
        checks.iter().filter(|(_, missing)| *missing).map(|(n, _)| *n).collect()
    }
}

/// One GPU in `/stats` `gpus` (PROTOCOL.md §1, new and optional).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuStats {
    pub index: u32,
    /// Percent busy.
    pub util: f64,
    /// °C.
    pub temp: i64,
    pub mem_used_mib: u64,
    pub mem_total_mib: u64,
    /// Watts; 0 when the GPU does not report it.
    pub power_w: f64,
}

/// `v` rounded to two decimals (0 for NaN or infinity).
pub(crate) fn round2(v: f64) -> f64 {
    if v.is_finite() { (v * 100.0).round() / 100.0 } else { 0.0 }
}
