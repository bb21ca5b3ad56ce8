//! GPU facts and metrics from the NVIDIA driver through NVML (`nvml-wrapper`), the library
//! loaded at run time: a host without the driver (or whose GPUs are all on vfio-pci) runs and
//! reports without it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError as Raw;

use super::{GpuFacts, GpuStats, round2};
use crate::vfio::PciAddress;

mod device;
pub use device::{DeviceFacts, MemoryHealth, PcieLink};

const MIB: u64 = 1024 * 1024;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// NVML could not be loaded or answered with an error.
#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    /// NVML placed a GPU at an address that is not a PCI address.
    #[error(
        "NVML gives GPU {index} the PCI location {domain:x}:{bus:x}:{device:x}, which is not valid"
    )]
    Address { index: u32, domain: u32, bus: u32, device: u32 },
    /// A call every sample needs failed.
    #[error("NVML could not {action}: {source}")]
    Call { action: &'static str, source: Raw },
    /// One GPU did not answer (lost, or fallen off the bus).
    #[error("NVML could not {action} for GPU {index}: {source}")]
    Device { index: u32, action: &'static str, source: Raw },
    /// No driver: the library is missing, or its `nvmlInit` failed.
    #[error("cannot load NVML from {library}: {source}")]
    Load { library: PathBuf, source: Raw },
}

/// An initialised NVML; `nvmlShutdown` runs on drop.
pub struct Nvml {
    inner: nvml_wrapper::Nvml,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nvml")
    }
}

impl Nvml {
    /// Loads `library` (a file name the dynamic loader resolves, or a path) and initialises it.
    pub fn load(library: &Path) -> Result<Nvml, NvmlError> {
        let mut builder = nvml_wrapper::Nvml::builder();
        builder.lib_path(OsStr::new(library.as_os_str()));
        let inner = builder
            .init()
            .map_err(|source| NvmlError::Load { library: library.to_path_buf(), source })?;
        Ok(Nvml { inner })
    }

    /// How many GPUs the driver owns (GPUs on vfio-pci are not among them).
    pub fn count(&self) -> Result<u32, NvmlError> {
        self.inner.device_count().map_err(|source| NvmlError::Call { action: "count GPUs", source })
    }

    /// The driver's version (`550.54.15`).
    pub fn driver_version(&self) -> Result<String, NvmlError> {
        self.inner
            .sys_driver_version()
            .map_err(|source| NvmlError::Call { action: "read the driver version", source })
    }

    /// The highest CUDA version the driver supports (`12.4`).
    pub fn cuda_version(&self) -> Result<String, NvmlError> {
        self.inner
            .sys_cuda_driver_version()
            .map(cuda_version_text)
            .map_err(|source| NvmlError::Call { action: "read the CUDA version", source })
    }

    /// Facts of the driver's GPUs for `/init/host`; name and memory of the first GPU.
    pub fn facts(&self) -> Result<GpuFacts, NvmlError> {
        let count = self.count()?;
        let mut facts = GpuFacts { count, ..Default::default() };
        if count > 0 {
            let first = self
                .inner
                .device_by_index(0)
                .map_err(|source| NvmlError::Call { action: "open GPU 0", source })?;
            facts.name = first.name().unwrap_or_default();
            facts.vram_gib =
                first.memory_info().map(|m| round2(m.total as f64 / GIB)).unwrap_or_default();
        }
        facts.max_cuda = self.inner.sys_cuda_driver_version().map(cuda_version).unwrap_or(0.0);
        Ok(facts)
    }

    /// One sample of every GPU the driver owns. A value a GPU does not report (power on some
    /// boards) is 0; a GPU that cannot be opened is left out.
    pub fn sample(&self) -> Result<Vec<GpuStats>, NvmlError> {
        let count = self.count()?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let Ok(device) = self.inner.device_by_index(index) else { continue };
            let memory = device.memory_info().ok();
            out.push(GpuStats {
                index,
                util: device.utilization_rates().map(|u| f64::from(u.gpu)).unwrap_or(0.0),
                temp: device.temperature(TemperatureSensor::Gpu).map(i64::from).unwrap_or(0),
                mem_used_mib: memory.as_ref().map(|m| m.used / MIB).unwrap_or(0),
                mem_total_mib: memory.as_ref().map(|m| m.total / MIB).unwrap_or(0),
                power_w: device
                    .power_usage()
                    .map(|mw| round2(f64::from(mw) / 1000.0))
                    .unwrap_or(0.0),
            });
        }
        Ok(out)
    }

    /// What the driver says is wrong with each GPU it owns, by PCI address: pages waiting to
    /// be retired, rows waiting to be remapped or a remapping that failed (memory the next
    /// tenant would get bad data from). GPUs that do not report a counter are not judged on it.
    pub fn health(&self) -> Vec<(PciAddress, String)> {
        let mut out = Vec::new();
        for index in 0..self.count().unwrap_or(0) {
            let Ok(device) = self.inner.device_by_index(index) else { continue };
            let Some(address) = device.pci_info().ok().as_ref().and_then(device::address_of) else {
                continue;
            };
            let problems = self.memory_health(&device).problems();
            if !problems.is_empty() {
                out.push((address, format!("NVML reports {}", problems.join("; "))));
            }
        }
        out
    }

    /// (remapping pending, remapping failed), from `nvmlDeviceGetRemappedRows`, which
    /// nvml-wrapper does not wrap; `None` where the GPU or driver does not support it.
    fn remapped_rows(&self, device: &nvml_wrapper::Device<'_>) -> Option<(bool, bool)> {
        let sym = self.inner.lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
        let (mut corrected, mut uncorrected, mut pending, mut failed) = (0u32, 0u32, 0u32, 0u32);
        // SAFETY: the handle belongs to this initialised NVML (borrowed for the call) and the
        // four out-pointers are valid u32s we own; the signature is nvml.h's.
        let status = unsafe {
            sym(device.handle(), &mut corrected, &mut uncorrected, &mut pending, &mut failed)
        };
        (status == 0).then_some((pending != 0, failed != 0))
    }
}

/// NVML's CUDA version (`12040`) as the control plane wants it (`12.4`).
pub fn cuda_version(raw: i32) -> f64 {
    cuda_version_text(raw).parse().unwrap_or(0.0)
}

/// NVML's CUDA version (`12040`) as `nvidia-smi` writes it (`"12.4"`).
pub fn cuda_version_text(raw: i32) -> String {
    format!("{}.{}", raw / 1000, (raw % 1000) / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_versions_read_as_major_dot_minor() {
        assert_eq!(cuda_version(12040), 12.4);
        assert_eq!(cuda_version(11080), 11.8);
        assert_eq!(cuda_version(12000), 12.0);
        assert_eq!(cuda_version(13010), 13.1);
    }

    #[test]
    fn a_missing_library_is_a_load_error() {
        let err = Nvml::load(Path::new("/nonexistent/libnvidia-ml.so.1")).unwrap_err();
        assert!(matches!(err, NvmlError::Load { .. }), "{err}");
        assert!(err.to_string().starts_with("cannot load NVML from /nonexistent/"), "{err}");
    }
}
