//! What this host is made of, for `POST /init/host`: read once at registration.
//!
//! Everything comes from files under injectable roots (`/proc`, `/sys`, `/etc`), so tests run
//! against a temporary tree. A fact that cannot be read is 0 or "" and named in `unknown`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the host's facts are read from.
#[derive(Clone, Debug)]
pub struct Roots {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub etc: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots { proc: "/proc".into(), sys: "/sys".into(), etc: "/etc".into() }
    }
}

/// The host facts the control plane records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFacts {
    pub cpu_name: String,
    /// Logical CPUs.
    pub cpu_cores: u32,
    /// Highest maximum frequency over all cores, GHz.
    pub cpu_freq_ghz: f64,
    pub ram_gib: f64,
    /// Size of the filesystem holding the data dir (where instance disks live), GiB.
    pub disk_gib: f64,
    /// Fastest link among the physical network interfaces, Mbit/s.
    pub link_mbps: f64,
    /// Names of the facts that could not be read (sent as 0 / "").
    pub unknown: Vec<&'static str>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Reads every fact; never fails, unknown facts are listed instead.
pub fn probe(roots: &Roots, data_dir: &Path) -> HostFacts {
    let cpuinfo = std::fs::read_to_string(roots.proc.join("cpuinfo")).unwrap_or_default();
    let mut facts = HostFacts {
        cpu_name: cpu_name(&cpuinfo).unwrap_or_default(),
        cpu_cores: cpuinfo.lines().filter(|l| key_of(l) == Some("processor")).count() as u32,
        cpu_freq_ghz: max_freq_ghz(roots, &cpuinfo).unwrap_or(0.0),
        ram_gib: mem_total_kib(&roots.proc).map(|k| k as f64 * 1024.0 / GIB).unwrap_or(0.0),
        disk_gib: total_bytes(data_dir).map(|b| b as f64 / GIB).unwrap_or(0.0),
        link_mbps: link_speed_mbps(&roots.sys).unwrap_or(0) as f64,
        unknown: Vec::new(),
    };
    let checks = [
        ("cpu_name", facts.cpu_name.is_empty()),
        ("cpu_cores", facts.cpu_cores == 0),
        ("cpu_freq", facts.cpu_freq_ghz == 0.0),
        ("ram", facts.ram_gib == 0.0),
        ("disk", facts.disk_gib == 0.0),
        ("ethernet_in/ethernet_out", facts.link_mbps == 0.0),
    ];
    facts.unknown = checks.iter().filter(|(_, missing)| *missing).map(|(n, _)| *n).collect();
    facts
}

fn key_of(line: &str) -> Option<&str> {
    line.split_once(':').map(|(k, _)| k.trim())
}

fn value_of<'a>(cpuinfo: &'a str, key: &str) -> impl Iterator<Item = &'a str> {
    cpuinfo.lines().filter_map(move |l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

fn cpu_name(cpuinfo: &str) -> Option<String> {
    value_of(cpuinfo, "model name").find(|v| !v.is_empty()).map(str::to_owned)
}

/// `cpufreq/cpuinfo_max_freq` (kHz) over all cores; else the highest `cpu MHz` of /proc/cpuinfo
/// (virtual machines often have no cpufreq).
fn max_freq_ghz(roots: &Roots, cpuinfo: &str) -> Option<f64> {
    let cpus = roots.sys.join("devices/system/cpu");
    let from_sys = std::fs::read_dir(&cpus)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("cpu").is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| read_number(&e.path().join("cpufreq/cpuinfo_max_freq")))
        .max();
    if let Some(khz) = from_sys.filter(|k| *k > 0) {
        return Some(khz as f64 / 1_000_000.0);
    }
    let mhz =
        value_of(cpuinfo, "cpu MHz").filter_map(|v| v.parse::<f64>().ok()).fold(0.0, f64::max);
    (mhz > 0.0).then(|| (mhz / 1000.0 * 100.0).round() / 100.0)
}

fn mem_total_kib(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Fastest link among interfaces backed by a device (virtual ones report made-up speeds).
/// `speed` reads -1 or fails for a link that is down.
fn link_speed_mbps(sys_root: &Path) -> Option<u64> {
    std::fs::read_dir(sys_root.join("class/net"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| read_number(&e.path().join("speed")))
        .filter(|s| *s > 0)
        .max()
}

fn read_number(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let n: i64 = text.trim().parse().ok()?;
    u64::try_from(n).ok()
}

/// Total size of the filesystem holding `path`.
fn total_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right size; statvfs fills it completely on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Some(st.f_blocks.saturating_mul(st.f_frsize))
}

/// `/etc/machine-id`, trimmed, or `"unknown"` (PROTOCOL.md §1 `fingerprint`).
pub fn fingerprint(roots: &Roots) -> String {
    std::fs::read_to_string(roots.etc.join("machine-id"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests;
