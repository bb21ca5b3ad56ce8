//! GPUs the agent no longer offers, and why: a reset between tenants that failed or hung, a
//! device that fell off the bus, an Xid the kernel logged. Persisted (atomically, 0600) in one
//! file beside the bind records, so a quarantine survives restarts; changed under a file lock,
//! so the agent and a `qudata-agent gpu release-quarantine` beside it never lose a write.
//!
//! A GPU quarantined by a failed reset keeps its functions on vfio-pci (probing a wedged
//! device with the host driver is what hangs hosts); the entry remembers the driver each came
//! from, so a release puts them back as a bind record would.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::VfioError;
use super::pci::PciAddress;
use super::record::BoundDevice;
use crate::fsutil::{self, FsError};

/// The file under the data dir.
pub const FILE_NAME: &str = "gpu-quarantine.json";

/// How long a change waits for another process's hold on the file's lock.
const LOCK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// One quarantined GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// One sentence: what was seen.
    pub reason: String,
    pub since: DateTime<Utc>,
    /// Functions of its slot left on vfio-pci, with the drivers they came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_on_vfio: Vec<BoundDevice>,
}

/// Kernel log lines about a GPU older than this were seen by an operator who released it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleared {
    /// `/proc/sys/kernel/random/boot_id` when it was released: another boot, another log.
    pub boot_id: String,
    /// Kernel log time (µs since boot) when it was released.
    pub log_micros: u64,
}

impl Cleared {
    /// Now, by the kernel log's clock (`CLOCK_MONOTONIC`, which printk's time follows) and
    /// this boot's id from `<proc_root>/sys/kernel/random/boot_id`.
    pub fn now(proc_root: &Path) -> Cleared {
        let boot_id = std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let log_micros = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
        Cleared { boot_id, log_micros }
    }

    /// Whether a kernel log line of this boot at `micros` came before the release.
    pub fn covers(&self, boot_id: &str, micros: u64) -> bool {
        self.boot_id == boot_id && micros <= self.log_micros
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub gpus: BTreeMap<PciAddress, Entry>,
    #[serde(default)]
    pub cleared: BTreeMap<PciAddress, Cleared>,
}

/// The quarantine file of one data dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantine {
    path: PathBuf,
}

impl Quarantine {
    pub fn new(data_dir: &Path) -> Quarantine {
        Quarantine { path: data_dir.join(FILE_NAME) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is quarantined now; nothing when the file does not exist. A corrupt file is an
    /// error, never read as "nothing": it may be the only note of a wedged GPU.
    pub fn load(&self) -> Result<State, VfioError> {
        let Some(bytes) = fsutil::read_optional(&self.path)? else { return Ok(State::default()) };
        serde_json::from_slice(&bytes).map_err(|e| VfioError::RecordCorrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// The entry of one GPU, if it is quarantined.
    pub fn get(&self, gpu: &PciAddress) -> Result<Option<Entry>, VfioError> {
        Ok(self.load()?.gpus.remove(gpu))
    }

    /// Quarantines `gpu` (an entry already there keeps its first reason and time, and gains
    /// the kept devices). Returns whether it is new.
    pub fn add(&self, gpu: &PciAddress, entry: Entry) -> Result<bool, VfioError> {
        self.update(|state| match state.gpus.get_mut(gpu) {
            Some(existing) => {
                for device in entry.kept_on_vfio {
                    if existing.kept_on_vfio.iter().all(|d| d.address != device.address) {
                        existing.kept_on_vfio.push(device);
                    }
                }
                false
            }
            None => {
                tracing::error!(gpu = %gpu, reason = %entry.reason, "GPU quarantined: it is no longer offered");
                state.gpus.insert(gpu.clone(), entry);
                true
            }
        })
    }

    /// Takes `gpu` out of quarantine and notes `cleared` (log lines before it are old news).
    /// Returns the entry it had.
    pub fn remove(&self, gpu: &PciAddress, cleared: Cleared) -> Result<Option<Entry>, VfioError> {
        self.update(|state| {
            state.cleared.insert(gpu.clone(), cleared);
            state.gpus.remove(gpu)
        })
    }

    /// Read, change and write back under an exclusive lock on `<file>.lock`.
    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> Result<T, VfioError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fsutil::ensure_private_dir(dir)?;
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| FsError::Write { path: lock_path.clone(), source })?;
        // Held only for a read and a small write; a holder stuck past the deadline (a hung
        // process) is an error, never a wait for ever.
        let deadline = std::time::Instant::now() + LOCK_DEADLINE;
        loop {
            // SAFETY: flock on a descriptor we own; released when `lock` is closed.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::EWOULDBLOCK)
                || std::time::Instant::now() >= deadline
            {
                return Err(FsError::Write { path: lock_path, source }.into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut state = self.load()?;
        let out = change(&mut state);
        let json = serde_json::to_vec_pretty(&state).expect("the quarantine always serialises");
        fsutil::write_atomic(&self.path, &json)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn gpu() -> PciAddress {
        "0000:65:00.0".parse().unwrap()
    }

    fn entry(reason: &str) -> Entry {
        Entry { reason: reason.into(), since: Utc::now(), kept_on_vfio: Vec::new() }
    }

    #[test]
    fn entries_persist_privately_keep_their_first_reason_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(dir.path());
        assert_eq!(q.load().unwrap(), State::default(), "no file: nothing quarantined");
        assert!(q.add(&gpu(), entry("reset failed")).unwrap());
        assert!(!q.add(&gpu(), entry("Xid 79")).unwrap(), "already quarantined");
        let again = Quarantine::new(dir.path());
        assert_eq!(again.get(&gpu()).unwrap().unwrap().reason, "reset failed");
        let mode = std::fs::metadata(q.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let cleared = Cleared { boot_id: "b".into(), log_micros: 7 };
        assert_eq!(q.remove(&gpu(), cleared.clone()).unwrap().unwrap().reason, "reset failed");
        let state = q.load().unwrap();
        assert!(state.gpus.is_empty());
        assert_eq!(state.cleared.get(&gpu()), Some(&cleared));
    }

    #[test]
    fn a_lock_held_elsewhere_is_waited_for_until_the_deadline_only() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(dir.path());
        let held = std::fs::File::create(q.path().with_extension("lock")).unwrap();
        // SAFETY: flock on a descriptor this test owns (another open file description, as
        // another process would have).
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        let err = q.add(&gpu(), entry("x")).unwrap_err();
        assert!(err.to_string().contains(".lock"), "{err}");
        drop(held);
        assert!(q.add(&gpu(), entry("x")).unwrap(), "free again");
    }

    #[test]
    fn a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{").unwrap();
        let err = Quarantine::new(dir.path()).load().unwrap_err();
        assert!(matches!(err, VfioError::RecordCorrupt { .. }), "{err}");
    }
}
