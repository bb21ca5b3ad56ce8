//! Per-GPU metrics for `/stats`: the guests' streams when they have fresh values (GPUs on
//! vfio-pci are visible only there), else NVML on the host, else none.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::GpuStats;
use super::nvml::Nvml;
use crate::guest::metrics::GuestGpuBoard;

/// Loads NVML for the host; without a driver the agent runs on, saying so in one line.
pub fn load_host_nvml(library: &Path) -> Option<Nvml> {
    match Nvml::load(library) {
        Ok(nvml) => {
            let count = nvml.count().unwrap_or(0);
            tracing::info!(library = %library.display(), gpus = count, "NVML loaded");
            Some(nvml)
        }
        Err(e) => {
            tracing::info!(reason = %e, "no NVIDIA driver on the host: GPU facts from the self-test inventory or PCI ids, GPU metrics from the guests only");
            None
        }
    }
}

pub struct GpuMetrics {
    host: Option<Nvml>,
    guests: GuestGpuBoard,
    /// Guest values older than this are not reported (a paused or hung guest).
    max_age: Duration,
    /// An NVML failure is logged once per streak.
    failing: AtomicBool,
}

impl GpuMetrics {
    /// `interval` is the stats period; guest values count as fresh for four of them (at
    /// least 2 s).
    pub fn new(host: Option<Nvml>, guests: GuestGpuBoard, interval: Duration) -> GpuMetrics {
        let max_age = (interval * 4).max(Duration::from_secs(2));
        GpuMetrics { host, guests, max_age, failing: AtomicBool::new(false) }
    }

    pub fn host(&self) -> Option<&Nvml> {
        self.host.as_ref()
    }

    /// The GPUs of one `/stats` sample, first GPU first.
    pub fn current(&self) -> Vec<GpuStats> {
        let guests = self.guests.fresh(self.max_age);
        if !guests.is_empty() {
            return guests;
        }
        let Some(nvml) = &self.host else { return Vec::new() };
        match nvml.sample() {
            Ok(gpus) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("NVML answers again");
                }
                gpus
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot sample the GPUs through NVML; reporting none until it answers");
                }
                Vec::new()
            }
        }
    }
}
