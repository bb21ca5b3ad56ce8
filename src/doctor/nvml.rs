//! The NVIDIA driver's own view of its GPUs (NVML, loaded the way the agent loads it for
//! metrics), compared with what sysfs says is bound to it.

use crate::gpu::nvml::Nvml;
use crate::gpu::{GpuDriver, Inventory};

use super::{Check, HostView, Status};

/// `ok` with the driver, CUDA version and GPUs when NVML loads and sees every GPU sysfs puts
/// on the nvidia driver; `warn` when it sees fewer (a GPU fallen off the bus) or does not load
/// while GPUs are on the driver (no host metrics); `ok` when nothing needs it.
pub fn nvml(view: &HostView) -> Check {
    let on_driver = Inventory::scan(&view.sysfs, None)
        .map(|inv| inv.gpus.iter().filter(|g| g.driver == GpuDriver::Nvidia).count())
        .unwrap_or(0);
    match Nvml::load(&view.nvml_library) {
        Ok(nvml) => loaded(&nvml, on_driver),
        Err(e) if on_driver > 0 => Check::new(
            "nvml",
            Status::Warn,
            format!("{e}; {on_driver} GPU(s) are on the nvidia driver: no GPU metrics"),
            "install the NVIDIA driver matching the kernel module (nvidia-smi must work)",
        ),
        Err(_) => Check::ok(
            "nvml",
            "not loaded: no GPU is on the nvidia driver (passed-through GPUs report from their \
             guests)",
        ),
    }
}

fn loaded(nvml: &Nvml, on_driver: usize) -> Check {
    let driver = nvml.driver_version().unwrap_or_else(|_| "of unknown version".to_owned());
    let facts = match nvml.facts() {
        Ok(facts) => facts,
        Err(e) => {
            return Check::new(
                "nvml",
                Status::Warn,
                format!("driver {driver} loads but {e}"),
                "run nvidia-smi; check dmesg for Xid errors",
            );
        }
    };
    let mut detail = format!("driver {driver}, CUDA {}: {} GPU(s)", facts.max_cuda, facts.count);
    if facts.count > 0 {
        detail.push_str(&format!(" ({}, {} GiB each)", facts.name, facts.vram_gib));
    }
    if (facts.count as usize) < on_driver {
        return Check::new(
            "nvml",
            Status::Warn,
            format!("{detail}, but sysfs has {on_driver} on the nvidia driver"),
            "run nvidia-smi; check dmesg for Xid errors (a GPU may have fallen off the bus)",
        );
    }
    Check::ok("nvml", detail)
}
