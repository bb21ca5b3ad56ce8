//! What this host can give an instance: the limits and defaults of a create request.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::instance::spec::HostLimits;

/// Memory kept for the host itself (agent, QEMU overhead, page cache).
const HOST_RESERVED_MIB: u64 = 2048;
/// Disk kept free on the data dir's filesystem.
const DISK_RESERVED_GB: u64 = 5;
/// Default disk of an instance when the request names none.
const DEFAULT_STORAGE_GB: u64 = 20;

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right size; statvfs fills it completely on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `MemTotal` of /proc/meminfo.
fn total_memory_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Probes CPUs, memory and the data dir's free space.
pub fn probe(data_dir: &Path) -> HostLimits {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let total_mib = total_memory_kib().unwrap_or(0) / 1024;
    let memory_mib = total_mib.saturating_sub(HOST_RESERVED_MIB).max(total_mib / 2).max(128);
    let free_gb = free_bytes(data_dir).unwrap_or(0) / (1024 * 1024 * 1024);
    let storage_gb = free_gb.saturating_sub(DISK_RESERVED_GB).max(1);
    HostLimits {
        cpus,
        memory_mib,
        storage_gb,
        default_cpus: cpus,
        default_memory_mib: memory_mib,
        default_storage_gb: DEFAULT_STORAGE_GB.min(storage_gb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_this_machine() {
        let limits = probe(Path::new("/"));
        assert!(limits.cpus >= 1 && limits.default_cpus <= limits.cpus);
        assert!(limits.memory_mib >= 128);
        assert!(limits.default_storage_gb <= limits.storage_gb);
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
        assert!(free_bytes(Path::new("/does/not/exist")).is_err());
    }
}
