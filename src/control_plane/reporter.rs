//! The stats loop: one sample every interval, sent in order, one request at a time. Samples
//! that cannot be sent wait in a bounded backlog (newest kept) until the control plane answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::buffer::{Backlog, CAPACITY};
use super::client::Client;
use super::error::ClientError;
use super::wire::{GpuStats, Stats};
use crate::gpu::GpuMetrics;
use crate::host::{HostSample, Sampler};
use crate::instance::Manager;
use crate::instance::model::Status;
use crate::secret::Secret;

/// What the agent knows beyond the host itself: the instance status and GPU metrics.
pub trait StatsSource: Send + Sync {
    fn status(&self) -> Status;

    /// Per-GPU metrics of a sample whose instance is in `status`, first GPU first.
    fn gpus(&self, status: Status) -> Vec<GpuStats>;

    /// Each offered GPU's health; empty when the host offers none.
    fn gpu_health(&self) -> Vec<crate::gpu::health::GpuHealth> {
        Vec::new()
    }
}

/// The production source: the instance manager's status and the GPUs' metrics.
pub struct AgentStats {
    pub manager: Manager,
    pub gpus: Arc<GpuMetrics>,
}

impl StatsSource for AgentStats {
    fn status(&self) -> Status {
        self.manager.current_status()
    }

    fn gpus(&self, status: Status) -> Vec<GpuStats> {
        // A deleted instance's guest values are not reported while its teardown (which
        // closes the stream) is still under way.
        if status == Status::Destroyed { self.gpus.host_only() } else { self.gpus.current() }
    }

    fn gpu_health(&self) -> Vec<crate::gpu::health::GpuHealth> {
        self.manager.gpu_health_report()
    }
}

type Sending = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

pub struct Reporter {
    pub client: Client,
    pub secret: Secret,
    pub source: Arc<dyn StatsSource>,
    pub sampler: Sampler,
    pub interval: Duration,
}

impl Reporter {
    /// Runs until `stop` turns true. Sampling never waits for the network: a slow or dead
    /// control plane only grows the backlog.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut backlog: Backlog<Stats> = Backlog::new(CAPACITY);
        let mut sending: Option<Sending> = None;
        // After a failure, wait for the next tick before trying again (no busy loop).
        let mut paused = false;
        let mut failing = false;
        // A refusal (4xx) is logged once per streak, not twice a second.
        let mut refusing = false;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {
                    backlog.push(self.sample());
                    paused = false;
                }
                result = async { sending.as_mut().expect("guarded").await }, if sending.is_some() => {
                    sending = None;
                    match result {
                        Ok(()) => {
                            backlog.pop();
                            refusing = false;
                            if std::mem::take(&mut failing) {
                                tracing::info!(kept = backlog.len() + 1, dropped = backlog.dropped(), "control plane answers /stats again; sending the kept samples");
                            }
                        }
                        Err(e) if e.is_transient() => {
                            paused = true;
                            if !std::mem::replace(&mut failing, true) {
                                tracing::warn!(error = %e, "cannot send stats; keeping up to {CAPACITY} samples until the control plane answers");
                            }
                        }
                        Err(e) => {
                            // Sending the same sample again cannot help.
                            backlog.pop();
                            if !std::mem::replace(&mut refusing, true) {
                                tracing::warn!(error = %e, "the control plane refuses stats samples; dropping them until it accepts one");
                            }
                        }
                    }
                }
            }
            if sending.is_none()
                && !paused
                && let Some(next) = backlog.front()
            {
                sending = Some(self.send(next.clone()));
            }
        }
    }

    fn sample(&mut self) -> Stats {
        let status = self.source.status();
        let mut stats = compose(self.sampler.sample(), status, self.source.gpus(status));
        stats.gpu_health = self.source.gpu_health();
        stats
    }

    fn send(&self, stats: Stats) -> Sending {
        let client = self.client.clone();
        let secret = self.secret.clone();
        Box::pin(async move { client.stats(&secret, &stats).await })
    }
}

/// One `/stats` body; the flat GPU keys carry the first GPU (**compat**: dashboards read them,
/// and an average would hide a GPU that is idle or hot).
pub fn compose(host: HostSample, status: Status, gpus: Vec<GpuStats>) -> Stats {
    let first = gpus.first();
    let mem_util = first
        .filter(|g| g.mem_total_mib > 0)
        .map(|g| (g.mem_used_mib as f64 * 10_000.0 / g.mem_total_mib as f64).round() / 100.0)
        .unwrap_or(0.0);
    Stats {
        gpu_util: first.map(|g| g.util).unwrap_or(0.0),
        gpu_temp: first.map(|g| g.temp).unwrap_or(0),
        cpu_util: host.cpu_util,
        ram_util: host.ram_util,
        mem_util,
        inet_in: host.inet_in,
        inet_out: host.inet_out,
        status,
        gpus,
        gpu_health: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostSample =
        HostSample { cpu_util: 5.5, ram_util: 60.0, inet_in: 10, inet_out: 20 };

    fn gpu(index: u32, util: f64, temp: i64, used: u64) -> GpuStats {
        GpuStats { index, util, temp, mem_used_mib: used, mem_total_mib: 80_000, power_w: 300.0 }
    }

    #[test]
    fn without_gpus_the_gpu_keys_are_zero() {
        let s = compose(HOST, Status::Running, Vec::new());
        assert_eq!((s.gpu_util, s.gpu_temp, s.mem_util), (0.0, 0, 0.0));
        assert_eq!((s.cpu_util, s.ram_util, s.inet_in, s.inet_out), (5.5, 60.0, 10, 20));
        assert_eq!(s.status, Status::Running);
    }

    #[test]
    fn flat_gpu_keys_carry_the_first_gpu() {
        let s = compose(HOST, Status::Paused, vec![gpu(0, 90.0, 70, 20_000), gpu(1, 10.0, 40, 0)]);
        assert_eq!((s.gpu_util, s.gpu_temp, s.mem_util), (90.0, 70, 25.0));
        assert_eq!(s.gpus.len(), 2);
    }
}
