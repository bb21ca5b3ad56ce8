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
use crate::host::Sampler;
use crate::instance::Manager;
use crate::instance::model::Status;
use crate::secret::Secret;

/// What the agent knows beyond the host itself: the instance status, and (later) GPU metrics.
pub trait StatsSource: Send + Sync {
    fn status(&self) -> Status;

    /// Per-GPU metrics, first GPU first; none until the GPU layer reports them.
    fn gpus(&self) -> Vec<GpuStats> {
        Vec::new()
    }
}

impl StatsSource for Manager {
    fn status(&self) -> Status {
        self.current_status()
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
                            tracing::warn!(error = %e, "the control plane refused a stats sample; dropped it");
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
        let host = self.sampler.sample();
        let gpus = self.source.gpus();
        // The flat GPU keys carry the first GPU (compat: dashboards read them).
        let first = gpus.first();
        let mem_util = first
            .filter(|g| g.mem_total_mib > 0)
            .map(|g| g.mem_used_mib as f64 * 100.0 / g.mem_total_mib as f64)
            .unwrap_or(0.0);
        Stats {
            gpu_util: first.map(|g| g.util).unwrap_or(0.0),
            gpu_temp: first.map(|g| g.temp).unwrap_or(0),
            cpu_util: host.cpu_util,
            ram_util: host.ram_util,
            mem_util,
            inet_in: host.inet_in,
            inet_out: host.inet_out,
            status: self.source.status(),
            gpus,
        }
    }

    fn send(&self, stats: Stats) -> Sending {
        let client = self.client.clone();
        let secret = self.secret.clone();
        Box::pin(async move { client.stats(&secret, &stats).await })
    }
}
