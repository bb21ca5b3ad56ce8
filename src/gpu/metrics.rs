//! Per-GPU metrics for `/stats`: the guests' streams when they have fresh values (GPUs on
//! vfio-pci are visible only there), else NVML on the host, else none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::GpuStats;
use super::host::HostNvml;
use super::nvml::Nvml;
use crate::guest::metrics::{GpuStreams, GuestGpuBoard};

/// What the VM backend feeds for `/stats` (production mode): the in-guest streams, and the
/// host's NVML, closed while GPUs are bound.
#[derive(Clone)]
pub struct GpuTelemetry {
    pub streams: Arc<GpuStreams>,
    pub host_nvml: Arc<HostNvml>,
    /// The stats period, also the streams' `-lms`.
    pub interval: Duration,
}

pub struct GpuMetrics {
    host: Option<Arc<HostNvml>>,
    guests: GuestGpuBoard,
    /// Guest values older than this are not reported (a paused or hung guest).
    max_age: Duration,
    /// An NVML failure is logged once per streak.
    failing: AtomicBool,
}

impl GpuMetrics {
    /// `interval` is the stats period; guest values count as fresh for four of them (at
    /// least 2 s).
    pub fn new(
        host: Option<Arc<HostNvml>>,
        guests: GuestGpuBoard,
        interval: Duration,
    ) -> GpuMetrics {
        let max_age = (interval * 4).max(Duration::from_secs(2));
        GpuMetrics { host, guests, max_age, failing: AtomicBool::new(false) }
    }

    /// The GPUs of one `/stats` sample, first GPU first.
    pub fn current(&self) -> Vec<GpuStats> {
        let guests = self.guests.fresh(self.max_age);
        if !guests.is_empty() {
            return guests;
        }
        self.host_only()
    }

    /// The host's GPUs through NVML, whatever the guests report.
    pub fn host_only(&self) -> Vec<GpuStats> {
        let Some(sample) = self.host.as_ref().and_then(|h| h.with(Nvml::sample)) else {
            return Vec::new(); // no driver, or closed while GPUs are being bound
        };
        match sample {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_guest_values_are_reported_else_none_without_nvml() {
        let board = GuestGpuBoard::default();
        let metrics = GpuMetrics::new(None, board.clone(), Duration::from_millis(500));
        assert!(metrics.current().is_empty(), "no driver, no guest: no GPU");
        let gpu = GpuStats {
            index: 3,
            util: 50.0,
            temp: 60,
            mem_used_mib: 1,
            mem_total_mib: 2,
            power_w: 70.5,
        };
        board.record("vm", gpu.clone());
        assert_eq!(metrics.current(), [GpuStats { index: 0, ..gpu }], "renumbered from 0");
        assert!(metrics.host_only().is_empty(), "the guest's values are not the host's");
        board.clear("vm");
        assert!(metrics.current().is_empty());
    }
}
