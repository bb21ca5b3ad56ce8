//! The QEMU process: started so it outlives the agent, found again by its pidfile, stopped
//! with a deadline.
//!
//! A VM must survive an agent restart, so QEMU gets its own process group (a signal to the
//! agent's group does not reach it), no stdin, its output appended to a log file, and no
//! kill-on-drop. While the agent runs it reaps its own child in a background task; after a
//! restart the VM is found through its pidfile, checked against `/proc/<pid>/cmdline`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use crate::instance::model::marker;

/// How often waits below look again.
const POLL: Duration = Duration::from_millis(50);

/// A QEMU process operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// QEMU exited while we waited for it.
    #[error("QEMU exited ({status}) before {waiting_for}; see {log}")]
    Exited { status: String, waiting_for: &'static str, log: PathBuf },
    /// The log file could not be opened.
    #[error("cannot open the QEMU log {path}: {source}; check the data dir")]
    Log { path: PathBuf, source: std::io::Error },
    /// RLIMIT_MEMLOCK could not be raised (VFIO pins all guest memory).
    #[error(
        "cannot raise RLIMIT_MEMLOCK to {bytes} bytes: {source}; run the agent as root with \
         CAP_SYS_RESOURCE or set LimitMEMLOCK=infinity in its systemd unit"
    )]
    Memlock { bytes: u64, source: std::io::Error },
    /// The pidfile is missing or does not hold a pid.
    #[error("cannot read the QEMU pidfile {path}: {detail}")]
    Pidfile { path: PathBuf, detail: String },
    /// QEMU could not be started.
    #[error("cannot start {binary}: {source}; install qemu-system-x86 or set QUDATA_QEMU_BINARY")]
    Spawn { binary: PathBuf, source: std::io::Error },
    /// Something did not happen before its deadline.
    #[error("{what} did not happen within {millis} ms")]
    Timeout { what: &'static str, millis: u128 },
}

/// A QEMU this agent started. Dropping it does not stop QEMU.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    log: PathBuf,
    /// `Some(status)` once the background task has reaped the child.
    exit: watch::Receiver<Option<String>>,
}

impl Spawned {
    /// The exit status, once QEMU has exited and been reaped.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Waits until QEMU has exited and been reaped; returns its exit status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<String, ProcessError> {
        let waited = tokio::time::timeout(deadline, self.exit.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(status)) => Ok(status.clone().unwrap_or_default()),
            // The reaper task is gone only if the runtime is shutting down.
            Ok(Err(_)) => Ok("unknown".into()),
            Err(_) => {
                Err(ProcessError::Timeout { what: "QEMU exit", millis: deadline.as_millis() })
            }
        }
    }

    /// Waits until QEMU has created `path` (its QMP socket); fails early if QEMU exits.
    pub async fn wait_for_path(&self, path: &Path, deadline: Duration) -> Result<(), ProcessError> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.exit_status() {
                let log = self.log.clone();
                return Err(ProcessError::Exited { status, waiting_for: "its QMP socket", log });
            }
            if path.exists() {
                return Ok(());
            }
            if Instant::now() >= end {
                let millis = deadline.as_millis();
                return Err(ProcessError::Timeout { what: "the QMP socket", millis });
            }
            sleep(POLL).await;
        }
    }
}

/// Locked memory a VM with passed-through devices needs: all of guest RAM is pinned for DMA,
/// plus room for QEMU's own mappings (libvirt's rule: guest memory + 1 GiB).
pub fn memlock_bytes(memory_mib: u64) -> u64 {
    (memory_mib << 20) + (1 << 30)
}

/// Raises the agent's RLIMIT_MEMLOCK to at least `bytes` (never lowers it). The child inherits
/// it at spawn, which is race-free: setting it on the child after spawn (`prlimit`) could come
/// after QEMU has already mapped guest memory for VFIO, and `setrlimit` in `pre_exec` runs in a
/// forked child where only async-signal-safe code is allowed.
pub fn raise_memlock(bytes: u64) -> Result<(), ProcessError> {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } != 0 {
        return Err(ProcessError::Memlock { bytes, source: std::io::Error::last_os_error() });
    }
    if current.rlim_cur >= bytes {
        return Ok(());
    }
    let wanted = libc::rlimit { rlim_cur: bytes, rlim_max: current.rlim_max.max(bytes) };
    // SAFETY: setrlimit reads the struct we own; it changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) } != 0 {
        return Err(ProcessError::Memlock { bytes, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Starts `binary argv…` detached from the agent's process group, output appended to `log`.
/// Raise RLIMIT_MEMLOCK first ([`raise_memlock`]) when the VM has passed-through devices.
/// Call it inside a Tokio runtime: the child is reaped by a task on it.
pub fn spawn(binary: &Path, argv: &[String], log: &Path) -> Result<Spawned, ProcessError> {
    let log_err = |source| ProcessError::Log { path: log.to_owned(), source };
    let out = OpenOptions::new().create(true).append(true).open(log).map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;
    let mut child = Command::new(binary)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| ProcessError::Spawn { binary: binary.to_owned(), source })?;
    let pid = child.id().unwrap_or_default();
    let (tx, exit) = watch::channel(None);
    // Reaps the child; QEMU keeps running if the agent exits first.
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        tracing::debug!(pid, %status, "QEMU exited");
        let _ = tx.send(Some(status));
    });
    Ok(Spawned { pid, log: log.to_owned(), exit })
}

/// The pid in a QEMU pidfile.
pub fn read_pidfile(path: &Path) -> Result<u32, ProcessError> {
    let err = |detail: String| ProcessError::Pidfile { path: path.to_owned(), detail };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.trim().parse().map_err(|_| err(format!("{:?} is not a pid", text.trim())))
}

/// Whether `argv` (NUL-separated, as in `/proc/<pid>/cmdline`) carries `-name qudata-<id>`.
pub fn cmdline_has_marker(cmdline: &[u8], id: &str) -> bool {
    let want = marker(id);
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"-name" && w[1] == want.as_bytes())
}

/// The pid of instance `id`'s QEMU, if the pidfile names a live process whose command line
/// carries its marker. A reused pid or a stale pidfile gives `None`.
pub fn owned_pid(pidfile: &Path, id: &str) -> Option<u32> {
    let pid = read_pidfile(pidfile).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (is_alive(pid) && cmdline_has_marker(&cmdline, id)).then_some(pid)
}

/// A process exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) only sends a signal; the pid was checked by the caller.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

async fn wait_gone(pid: u32, until: Instant) -> bool {
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        sleep(POLL).await;
    }
}

/// Stops instance `id`'s QEMU: SIGTERM, then SIGKILL after `grace`. Does nothing when the
/// pidfile does not name its live QEMU (never a process found by name alone). Returns whether
/// a process was stopped.
pub async fn terminate(pidfile: &Path, id: &str, grace: Duration) -> Result<bool, ProcessError> {
    let Some(pid) = owned_pid(pidfile, id) else {
        return Ok(false);
    };
    signal(pid, libc::SIGTERM);
    if wait_gone(pid, Instant::now() + grace).await {
        return Ok(true);
    }
    tracing::warn!(pid, id, "QEMU ignored SIGTERM; sending SIGKILL");
    signal(pid, libc::SIGKILL);
    if wait_gone(pid, Instant::now() + Duration::from_secs(5)).await {
        Ok(true)
    } else {
        Err(ProcessError::Timeout { what: "QEMU exit after SIGKILL", millis: 5000 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_must_follow_dash_name() {
        let id = "3f2a";
        assert!(cmdline_has_marker(b"qemu\0-name\0qudata-3f2a\0-S\0", id));
        assert!(!cmdline_has_marker(b"qemu\0-name\0qudata-3f2ab\0", id));
        assert!(!cmdline_has_marker(b"qemu\0qudata-3f2a\0", id));
        assert!(!cmdline_has_marker(b"vim\0-name\0", id));
    }

    #[test]
    fn memlock_covers_guest_memory_and_a_gib() {
        assert_eq!(memlock_bytes(2048), (2 << 30) + (1 << 30));
    }

    fn memlock() -> libc::rlimit {
        let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) }, 0);
        now
    }

    /// Works unprivileged: lowers the soft limit below the hard one, then raises it back.
    #[test]
    fn raised_memlock_is_inherited_by_children() {
        let hard = memlock().rlim_max;
        let low = libc::rlimit { rlim_cur: 1 << 20, rlim_max: hard };
        // SAFETY: setrlimit reads the struct we own; lowering the soft limit needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &low) }, 0);
        let wanted = if hard == libc::RLIM_INFINITY { 64 << 20 } else { hard };
        raise_memlock(wanted).unwrap();
        raise_memlock(1).unwrap(); // never lowers
        assert_eq!(memlock().rlim_cur, wanted);
        let limits = std::process::Command::new("cat").arg("/proc/self/limits").output().unwrap();
        let text = String::from_utf8(limits.stdout).unwrap();
        let line = text.lines().find(|l| l.starts_with("Max locked memory")).unwrap();
        assert_eq!(line.split_whitespace().nth(3), Some(wanted.to_string().as_str()), "{line}");
        // Past the hard limit it takes CAP_SYS_RESOURCE; without it the error says what to do.
        if hard != libc::RLIM_INFINITY
            && let Err(err) = raise_memlock(hard + 1)
        {
            assert!(err.to_string().contains("LimitMEMLOCK"), "{err}");
        }
    }

    #[test]
    fn pidfile_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.pid");
        assert!(read_pidfile(&path).unwrap_err().to_string().contains("qemu.pid"));
        std::fs::write(&path, "12ab\n").unwrap();
        assert!(matches!(read_pidfile(&path), Err(ProcessError::Pidfile { .. })));
        std::fs::write(&path, "4242\n").unwrap();
        assert_eq!(read_pidfile(&path).unwrap(), 4242);
    }

    #[test]
    fn this_process_is_alive_and_not_owned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.pid");
        std::fs::write(&path, std::process::id().to_string()).unwrap();
        assert!(is_alive(std::process::id()));
        assert_eq!(owned_pid(&path, "abc"), None);
    }
}
