//! One reconciler at a time: the running agent holds an exclusive `flock` on
//! `<run dir>/agent.lock` for its whole life, and `recover` takes the same lock. The kernel
//! drops the lock when its holder dies, so a crash never leaves it stuck.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::{Instant, sleep};

/// How often a waiting taker tries again.
const POLL: Duration = Duration::from_millis(100);

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock file {path}: {source}; check QUDATA_RUN_DIR")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(
        "{holder} holds {path} (waited {seconds} s): only one of the agent and `recover` may \
         reconcile at a time; stop the agent first (systemctl stop qudata-agent), or look \
         without changing anything with `recover --dry-run`"
    )]
    Busy { path: PathBuf, holder: String, seconds: u64 },
}

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// The lock file in `run_dir`.
pub fn lock_path(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.lock")
}

fn try_flock(file: &File) -> bool {
    // SAFETY: flock(2) on a descriptor this function's caller owns; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl RunLock {
    /// Takes the lock, waiting up to `wait` for its holder to let go. `role` (`run`,
    /// `recover`) is written into the file so a refused taker can say who holds it.
    pub async fn acquire(run_dir: &Path, role: &str, wait: Duration) -> Result<RunLock, LockError> {
        let path = lock_path(run_dir);
        let open_err = |source| LockError::Open { path: path.clone(), source };
        crate::fsutil::ensure_private_dir(run_dir)
            .map_err(|e| open_err(std::io::Error::other(e.to_string())))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(open_err)?;
        let until = Instant::now() + wait;
        while !try_flock(&file) {
            if Instant::now() >= until {
                let holder = holder(&path);
                return Err(LockError::Busy { path, holder, seconds: wait.as_secs() });
            }
            sleep(POLL).await;
        }
        // Not state: a note for the next taker's refusal message.
        let note = format!("pid {} ({role})\n", std::process::id());
        let _ = file.set_len(0).and_then(|()| file.write_all(note.as_bytes()));
        Ok(RunLock { _file: file })
    }

    /// Whether another process holds the lock now (for `recover --dry-run`'s note).
    pub fn held_by_other(run_dir: &Path) -> Option<String> {
        let path = lock_path(run_dir);
        let file = File::open(&path).ok()?;
        if try_flock(&file) {
            return None; // closing the file releases it again
        }
        Some(holder(&path))
    }
}

fn holder(path: &Path) -> String {
    let note = std::fs::read_to_string(path).unwrap_or_default();
    match note.trim() {
        "" => "another qudata-agent process".to_owned(),
        note => format!("qudata-agent {note}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_taker_waits_then_refuses_and_gets_it_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = RunLock::acquire(dir.path(), "run", Duration::ZERO).await.unwrap();
        let holder = RunLock::held_by_other(dir.path());
        // flock locks belong to the open file, so a second open in this process conflicts too.
        assert_eq!(
            holder.as_deref(),
            Some(format!("qudata-agent pid {} (run)", std::process::id()).as_str())
        );
        let refused = RunLock::acquire(dir.path(), "recover", Duration::from_millis(300)).await;
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("(run) holds") && message.contains("--dry-run"), "{message}");
        drop(held);
        assert_eq!(RunLock::held_by_other(dir.path()), None);
        RunLock::acquire(dir.path(), "recover", Duration::ZERO).await.unwrap();
    }
}
