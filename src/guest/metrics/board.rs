//! The latest in-guest GPU values, per instance and GPU, shared by the streams that write
//! them and the stats loop that reads them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::gpu::GpuStats;

type Readings = BTreeMap<String, BTreeMap<u32, (GpuStats, Instant)>>;

/// Cheap to clone; all clones share the values.
#[derive(Clone, Debug, Default)]
pub struct GuestGpuBoard {
    readings: Arc<Mutex<Readings>>,
}

impl GuestGpuBoard {
    pub fn record(&self, instance: &str, gpu: GpuStats) {
        let mut readings = self.readings.lock().expect("board lock");
        let gpus = readings.entry(instance.to_owned()).or_default();
        gpus.insert(gpu.index, (gpu, Instant::now()));
    }

    /// Forgets an instance's values (its stream ended or broke).
    pub fn clear(&self, instance: &str) {
        self.readings.lock().expect("board lock").remove(instance);
    }

    /// Values younger than `max_age`, instances in id order, GPUs in index order, renumbered
    /// from 0 across instances (each guest counts its own GPUs from 0).
    pub fn fresh(&self, max_age: Duration) -> Vec<GpuStats> {
        let readings = self.readings.lock().expect("board lock");
        let now = Instant::now();
        let all = readings.values().flat_map(|gpus| gpus.values());
        let fresh = all.filter(|(_, at)| now.duration_since(*at) <= max_age);
        fresh.enumerate().map(|(i, (gpu, _))| GpuStats { index: i as u32, ..gpu.clone() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, util: f64) -> GpuStats {
        GpuStats { index, util, temp: 50, mem_used_mib: 1, mem_total_mib: 2, power_w: 3.0 }
    }

    #[tokio::test(start_paused = true)]
    async fn latest_fresh_values_renumbered_across_instances() {
        let board = GuestGpuBoard::default();
        board.record("b", gpu(0, 10.0));
        board.record("a", gpu(1, 20.0));
        board.record("a", gpu(0, 30.0));
        board.record("a", gpu(0, 40.0)); // newer value of the same GPU wins
        let utils: Vec<(u32, f64)> =
            board.fresh(Duration::from_secs(1)).iter().map(|g| (g.index, g.util)).collect();
        assert_eq!(utils, [(0, 40.0), (1, 20.0), (2, 10.0)]);

        tokio::time::advance(Duration::from_secs(2)).await;
        board.record("b", gpu(0, 50.0));
        let fresh = board.fresh(Duration::from_secs(1));
        assert_eq!(fresh.iter().map(|g| g.util).collect::<Vec<_>>(), [50.0], "stale ones left out");
        board.clear("b");
        assert_eq!(board.fresh(Duration::from_secs(10)).len(), 2, "a's values stay until cleared");
        board.clear("a");
        assert!(board.fresh(Duration::from_secs(10)).is_empty());
    }
}
