//! What this host can give an instance: the limits and defaults of a create request.

use std::path::Path;

use crate::instance::spec::HostLimits;

/// Memory kept for the host itself (agent, QEMU overhead, page cache): this much at least…
const HOST_RESERVED_MIB: u64 = 2048;
/// …or this share of its memory, whichever is larger.
const HOST_RESERVED_PERCENT: u64 = 10;
/// Disk kept free on the data dir's filesystem.
/// Disk kept free for the host (GiB), the same as each create checks again.
const DISK_RESERVED_GB: u64 = crate::backend::qemu::disk::HOST_DISK_RESERVE_GB;
/// Default disk of an instance when the request names none.
const DEFAULT_STORAGE_GB: u64 = 20;
/// Local mode's instance when the request names no size: a newcomer's laptop keeps working.
const LOCAL_DEFAULT_CPUS: u32 = 1;
const LOCAL_DEFAULT_MEMORY_MIB: u64 = 1024;

/// What the host has, as read from /proc and the data dir's filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_mib: u64,
    /// Memory set aside as huge pages (not available to ordinary allocations).
    pub hugepages_mib: u64,
    pub free_disk_gb: u64,
}

/// The instance size the operator configured (`QUDATA_INSTANCE_*`), if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

/// A `kB` value of /proc/meminfo, in MiB.
fn meminfo_mib(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

/// Total memory and huge pages (MiB) from the text of /proc/meminfo.
pub fn memory_from_meminfo(meminfo: &str) -> (u64, u64) {
    let total = meminfo_mib(meminfo, "MemTotal:").unwrap_or(0);
    let count: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("HugePages_Total:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let page_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("Hugepagesize:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (total, count.saturating_mul(page_kib) / 1024)
}

/// Limits and defaults from the host's facts: an instance never gets more vCPUs than the host
/// has, nor more memory than the larger of its huge page pool and what is left less its
/// reserve (2 GiB or 10 %, whichever is larger) and the pool. A configured default above
/// that is lowered to it (and logged).
pub fn limits_from(host: HostFacts, wanted: Wanted, local: bool) -> HostLimits {
    let cpus = host.cpus.max(1);
    let reserve = HOST_RESERVED_MIB.max(host.memory_mib * HOST_RESERVED_PERCENT / 100);
    // A VM's memory comes from the huge page pool when the host has one (see
    // `backend::qemu::topology`, which checks the pool itself), else from ordinary memory.
    let ordinary = host.memory_mib.saturating_sub(reserve + host.hugepages_mib);
    let memory_mib = ordinary.max(host.hugepages_mib).max(128);
    let storage_gb = host.free_disk_gb.saturating_sub(DISK_RESERVED_GB).max(1);
    let (cpus_default, memory_default) = match local {
        true => (LOCAL_DEFAULT_CPUS, LOCAL_DEFAULT_MEMORY_MIB),
        false => (cpus, memory_mib),
    };
    let default_cpus = wanted.cpus.unwrap_or(cpus_default);
    let default_memory_mib = wanted.memory_mib.unwrap_or(memory_default);
    if default_cpus > cpus || default_memory_mib > memory_mib {
        tracing::warn!(
            default_cpus,
            default_memory_mib,
            cpus,
            memory_mib,
            "the configured instance size is more than this host can give; using the host's limit"
        );
    }
    HostLimits {
        cpus,
        memory_mib,
        storage_gb,
        default_cpus: default_cpus.min(cpus),
        default_memory_mib: default_memory_mib.min(memory_mib),
        default_storage_gb: DEFAULT_STORAGE_GB.min(storage_gb),
    }
}

/// Probes CPUs, memory and the data dir's free space.
pub fn probe(data_dir: &Path, wanted: Wanted, local: bool) -> HostLimits {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (memory_mib, hugepages_mib) = memory_from_meminfo(&meminfo);
    let host = HostFacts {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
        memory_mib,
        hugepages_mib,
        free_disk_gb: crate::fsutil::free_bytes(data_dir).unwrap_or(0) / (1024 * 1024 * 1024),
    };
    limits_from(host, wanted, local)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024;

    fn host(cpus: u32, memory_mib: u64, hugepages_mib: u64) -> HostFacts {
        HostFacts { cpus, memory_mib, hugepages_mib, free_disk_gb: 100 }
    }

    #[test]
    fn the_host_keeps_its_reserve_and_vms_may_have_the_huge_page_pool() {
        // (host memory, huge pages) → the most an instance may get.
        let cases = [
            (24 * GIB, 0, 24 * GIB - 2457), // 10 % of 24 GiB is more than 2 GiB
            (8 * GIB, 0, 6 * GIB),          // 2 GiB is more than 10 %
            (512 * GIB, 0, 512 * GIB - 52_428), // 10 %
            // VMs' memory comes from the pool: the pool is the limit when it is the larger.
            (512 * GIB, 256 * GIB, 256 * GIB),
            (512 * GIB, 64 * GIB, 512 * GIB - 52_428 - 64 * GIB),
            (1024, 0, 128), // a tiny host still has a floor
        ];
        for (memory, huge, limit) in cases {
            let l = limits_from(host(8, memory, huge), Wanted::default(), false);
            assert_eq!(l.memory_mib, limit, "{memory} MiB with {huge} MiB of huge pages");
            assert_eq!((l.default_memory_mib, l.default_cpus), (limit, 8));
        }
    }

    #[test]
    fn local_mode_defaults_to_a_small_vm_and_configuration_wins_up_to_the_limit() {
        let facts = host(2, 24 * GIB, 0);
        let local = limits_from(facts, Wanted::default(), true);
        assert_eq!((local.default_cpus, local.default_memory_mib), (1, 1024));
        assert_eq!((local.cpus, local.memory_mib), (2, 24 * GIB - 2457));
        let wanted = Wanted { cpus: Some(2), memory_mib: Some(4 * GIB) };
        let l = limits_from(facts, wanted, false);
        assert_eq!((l.default_cpus, l.default_memory_mib), (2, 4 * GIB));
        let greedy = Wanted { cpus: Some(64), memory_mib: Some(64 * GIB) };
        let l = limits_from(facts, greedy, true);
        assert_eq!((l.default_cpus, l.default_memory_mib), (2, 24 * GIB - 2457));
        let tiny = limits_from(host(1, 1024, 0), Wanted::default(), true);
        assert_eq!((tiny.default_cpus, tiny.default_memory_mib), (1, 128));
    }

    #[test]
    fn meminfo_gives_total_and_huge_pages() {
        let text = "MemTotal:       24634452 kB\nMemFree:  1 kB\nHugePages_Total:     512\n\
                    Hugepagesize:       2048 kB\n";
        assert_eq!(memory_from_meminfo(text), (24057, 1024));
        assert_eq!(memory_from_meminfo(""), (0, 0));
    }

    #[test]
    fn probe_reports_this_machine() {
        let limits = probe(Path::new("/"), Wanted::default(), false);
        assert!(limits.cpus >= 1 && limits.default_cpus <= limits.cpus);
        assert!(limits.memory_mib >= 128 && limits.default_memory_mib <= limits.memory_mib);
        assert!(limits.default_storage_gb <= limits.storage_gb);
        assert!(crate::fsutil::free_bytes(Path::new("/")).unwrap() > 0);
        assert!(crate::fsutil::free_bytes(Path::new("/does/not/exist")).is_err());
    }
}
