//! One telemetry sample of the host: CPU and memory use (sysinfo) and network bytes since the
//! previous sample (`/proc/net/dev`).

use std::path::PathBuf;

use sysinfo::System;

use super::netdev;

/// Host part of a `/stats` sample.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostSample {
    /// Percent of all CPUs busy since the previous sample.
    pub cpu_util: f64,
    /// Percent of memory in use.
    pub ram_util: f64,
    pub inet_in: u64,
    pub inet_out: u64,
}

/// Keeps what deltas need between samples. Cheap enough to call every 500 ms.
pub struct Sampler {
    system: Option<System>,
    net_dev: PathBuf,
    net: netdev::Delta,
}

impl Sampler {
    /// `proc_root` is `/proc` in production.
    pub fn new(proc_root: impl Into<PathBuf>) -> Sampler {
        let system = match System::new() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CPU and memory use; cpu_util and ram_util report 0");
                None
            }
        };
        let mut sampler =
            Sampler { system, net_dev: proc_root.into().join("net/dev"), net: Default::default() };
        // Primes the CPU and network baselines, so the first real sample is a true delta.
        sampler.sample();
        sampler
    }

    pub fn sample(&mut self) -> HostSample {
        let (cpu_util, ram_util) = match self.system.as_mut() {
            Some(sys) => {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                let total = sys.total_memory();
                let ram =
                    if total == 0 { 0.0 } else { sys.used_memory() as f64 * 100.0 / total as f64 };
                (f64::from(sys.global_cpu_usage()), ram)
            }
            None => (0.0, 0.0),
        };
        let text = std::fs::read_to_string(&self.net_dev).unwrap_or_default();
        let (inet_in, inet_out) = self.net.next(netdev::parse(&text));
        HostSample { cpu_util: round2(cpu_util), ram_util: round2(ram_util), inet_in, inet_out }
    }
}

fn round2(v: f64) -> f64 {
    if v.is_finite() { (v * 100.0).round() / 100.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_the_real_host_within_bounds() {
        let mut s = Sampler::new("/proc");
        std::thread::sleep(std::time::Duration::from_millis(250));
        let got = s.sample();
        assert!((0.0..=100.0).contains(&got.cpu_util), "{got:?}");
        assert!(got.ram_util > 0.0 && got.ram_util <= 100.0, "{got:?}");
    }

    #[test]
    fn network_deltas_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net")).unwrap();
        let line =
            |rx: u64, tx: u64| format!("h1\nh2\n  eth0: {rx} 0 0 0 0 0 0 0 {tx} 0 0 0 0 0 0 0\n");
        std::fs::write(dir.path().join("net/dev"), line(100, 200)).unwrap();
        let mut s = Sampler::new(dir.path());
        std::fs::write(dir.path().join("net/dev"), line(1100, 260)).unwrap();
        let got = s.sample();
        assert_eq!((got.inet_in, got.inet_out), (1000, 60));
    }
}
