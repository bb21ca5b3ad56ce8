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
        self.record_at(instance, gpu, Instant::now());
    }

    fn record_at(&self, instance: &str, gpu: GpuStats, at: Instant) {
        let mut readings = self.readings.lock().expect("board lock");
        let gpus = readings.entry(instance.to_owned()).or_default();
        gpus.insert(gpu.index, (gpu, at));
    }

    /// Forgets an instance's values (its stream ended or broke).
    pub fn clear(&self, instance: &str) {
        self.readings.lock().expect("board lock").remove(instance);
    }

    /// Values younger than `max_age`, instances in id order, GPUs in index order, renumbered
    /// from 0 across instances (each guest counts its own GPUs from 0).
    pub fn fresh(&self, max_age: Duration) -> Vec<GpuStats> {
        self.fresh_at(Instant::now(), max_age)
    }

    fn fresh_at(&self, now: Instant, max_age: Duration) -> Vec<GpuStats> {
        let readings = self.readings.lock().expect("board lock");
        let all = readings.values().flat_map(|gpus| gpus.values());
        let fresh = all.filter(|(_, at)| now.saturating_duration_since(*at) <= max_age);
        fresh.enumerate().map(|(i, (gpu, _))| GpuStats { index: i as u32, ..gpu.clone() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, util: f64) -> GpuStats {
        GpuStats { index, util, temp: 50, mem_used_mib: 1, mem_total_mib: 2, power_w: 3.0 }
    }

    #[test]
    fn latest_fresh_values_renumbered_across_instances() {
        let board = GuestGpuBoard::default();
        let t0 = Instant::now();
        board.record_at("b", gpu(0, 10.0), t0);
        board.record_at("a", gpu(1, 20.0), t0);
        board.record_at("a", gpu(0, 30.0), t0);
        board.record_at("a", gpu(0, 40.0), t0); // newer value of the same GPU wins
        let utils = |now, age| -> Vec<(u32, f64)> {
            board
                .fresh_at(now, Duration::from_secs(age))
                .iter()
                .map(|g| (g.index, g.util))
                .collect()
        };
        assert_eq!(utils(t0, 1), [(0, 40.0), (1, 20.0), (2, 10.0)]);

        let later = t0 + Duration::from_secs(2);
        assert!(utils(later, 1).is_empty(), "all stale");
        board.record_at("b", gpu(0, 50.0), later);
        assert_eq!(utils(later, 1), [(0, 50.0)], "stale ones left out, renumbered");
        board.clear("b");
        assert_eq!(utils(later, 10).len(), 2, "a's values stay until cleared");
        board.clear("a");
        assert!(utils(later, 10).is_empty());
    }
}
