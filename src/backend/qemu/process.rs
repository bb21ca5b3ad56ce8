//! Starting QEMU so it outlives the agent, and reading its pidfile.
//!
//! A VM must survive an agent restart, so QEMU gets its own process group (a signal to the
//! agent's group does not reach it), no stdin, its output appended to a log file, and no
//! kill-on-drop. While the agent runs it reaps its own child in a background task; after a
//! restart the VM is found again as a [`super::vm_process::VmProcess`].

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::confine::QemuUser;
use crate::pidfd::PidFd;

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
    /// The child could not switch to QEMU's unprivileged user.
    #[error(
        "cannot start QEMU as the user {user}: the switch of user was refused; run the agent as root"
    )]
    RunAs { user: String },
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
    /// The child could not be pinned with a pidfd (it was killed again).
    #[error("cannot watch {binary} (pid {pid}): {source}; the agent needs Linux 5.3 or newer")]
    Watch { binary: PathBuf, pid: u32, source: std::io::Error },
    /// Something did not happen before its deadline.
    #[error("{what} did not happen within {millis} ms")]
    Timeout { what: &'static str, millis: u128 },
}

/// A QEMU this agent started. Dropping it does not stop QEMU.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    /// Opened before the reaper could run, so it pins this child and no later process.
    pub pidfd: PidFd,
    log: PathBuf,
    /// Where this QEMU's output starts in `log` (it is appended to across starts).
    pub log_start: u64,
    /// `Some(status)` once the background task has reaped the child.
    exit: watch::Receiver<Option<String>>,
}

impl Spawned {
    /// The exit status, once QEMU has exited and been reaped.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Waits until QEMU has exited and been reaped; returns its exit status.
    pub async fn wait_exit(&self, deadline: Duration) -> Result<String, ProcessError> {
        let mut exit = self.exit.clone();
        let waited = tokio::time::timeout(deadline, exit.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(status)) => Ok(status.clone().unwrap_or_default()),
            // The reaper task is gone only if the runtime is shutting down.
            Ok(Err(_)) => Ok("unknown".into()),
            Err(_) => {
                Err(ProcessError::Timeout { what: "QEMU exit", millis: deadline.as_millis() })
            }
        }
    }

    /// QEMU's exit as an error, if it exits within `within` (a monitor that closed on the
    /// agent is a QEMU on its way out: its reaper may need a moment).
    pub async fn exited_before(
        &self,
        waiting_for: &'static str,
        within: Duration,
    ) -> Option<ProcessError> {
        let status = self.wait_exit(within).await.ok()?;
        Some(ProcessError::Exited { status, waiting_for, log: self.log.clone() })
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

/// The RLIMIT_MEMLOCK a child needs for `bytes` of locked memory: `None` when the current
/// limit already allows it (never lowered). The hard limit is raised with the soft one, which
/// takes CAP_SYS_RESOURCE past the current hard limit.
fn memlock_limit(bytes: u64) -> Result<Option<libc::rlimit>, ProcessError> {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } != 0 {
        return Err(ProcessError::Memlock { bytes, source: std::io::Error::last_os_error() });
    }
    if current.rlim_cur >= bytes {
        return Ok(None);
    }
    Ok(Some(libc::rlimit { rlim_cur: bytes, rlim_max: current.rlim_max.max(bytes) }))
}

/// Starts `binary argv…` detached from the agent's process group, output appended to `log`.
/// Call it inside a Tokio runtime: the child is reaped by a task on it.
pub fn spawn(binary: &Path, argv: &[String], log: &Path) -> Result<Spawned, ProcessError> {
    spawn_with(binary, argv, log, &ChildSetup::default())
}

/// What changes in QEMU's process between fork and exec.
#[derive(Default)]
pub struct ChildSetup<'a> {
    /// RLIMIT_MEMLOCK raised to at least this many bytes (see [`memlock_bytes`]).
    pub memlock: Option<u64>,
    /// Run as this user.
    pub user: Option<&'a QemuUser>,
    /// Descriptors the child keeps across exec (a tap's queues, vhost-net), at their numbers.
    pub inherit: &'a [std::os::fd::RawFd],
}

/// The error code a child reports when it cannot become QEMU's user (not one exec gives).
const RUN_AS_FAILED: i32 = libc::ENOTRECOVERABLE;

/// [`spawn`], set up as `setup` says: the child's RLIMIT_MEMLOCK raised (a VM with
/// passed-through devices pins all of its memory), the descriptors it inherits, and run as
/// its user ([`QemuUser`]). Only the child changes, between fork and exec: the limit first
/// (only root may raise it, and it stays across the change of user), then the descriptors,
/// then groups, gid and uid.
pub fn spawn_with(
    binary: &Path,
    argv: &[String],
    log: &Path,
    setup: &ChildSetup<'_>,
) -> Result<Spawned, ProcessError> {
    let (memlock, user) = (setup.memlock, setup.user);
    let log_err = |source| ProcessError::Log { path: log.to_owned(), source };
    let out = OpenOptions::new().create(true).append(true).open(log).map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;
    let log_start = out.metadata().map_or(0, |m| m.len());
    let mut command = Command::new(binary);
    command
        .args(argv)
        // QEMU outlives the agent: it must not carry the API key or systemd's NOTIFY_SOCKET.
        .env_clear()
        .envs(crate::child_env::for_child())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    let limit = match memlock {
        Some(bytes) => memlock_limit(bytes)?,
        None => None,
    };
    // Copied before the fork: the child allocates nothing.
    let identity = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    let inherit = setup.inherit.to_vec();
    if limit.is_some() || identity.is_some() || !inherit.is_empty() {
        // SAFETY: the closure runs in the forked child before exec. It only makes plain
        // system calls (setrlimit, fcntl, setgroups, setgid, setuid) that neither allocate nor
        // take locks, on values moved in before the fork, and builds its error from errno
        // without allocating.
        unsafe {
            command.pre_exec(move || {
                if let Some(limit) = &limit
                    && libc::setrlimit(libc::RLIMIT_MEMLOCK, limit) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Opened close-on-exec by the agent (no other child inherits them): kept here.
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid, groups)) = &identity
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0)
                {
                    // A code of its own, so the parent tells it from a refused memlock limit.
                    return Err(std::io::Error::from_raw_os_error(RUN_AS_FAILED));
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn().map_err(|source| match (limit, source.raw_os_error()) {
        (_, Some(RUN_AS_FAILED)) => {
            ProcessError::RunAs { user: user.map(|u| u.name.clone()).unwrap_or_default() }
        }
        (Some(l), Some(libc::EPERM)) => ProcessError::Memlock { bytes: l.rlim_cur, source },
        _ => ProcessError::Spawn { binary: binary.to_owned(), source },
    })?;
    let pid = child.id().unwrap_or_default();
    let pidfd = match PidFd::open(pid) {
        Ok(pidfd) => pidfd,
        Err(source) => {
            let _ = child.start_kill();
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            return Err(ProcessError::Watch { binary: binary.to_owned(), pid, source });
        }
    };
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
    Ok(Spawned { pid, pidfd, log: log.to_owned(), log_start, exit })
}

/// The pid in a QEMU pidfile.
pub fn read_pidfile(path: &Path) -> Result<u32, ProcessError> {
    let err = |detail: String| ProcessError::Pidfile { path: path.to_owned(), detail };
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // QEMU's user writes it in its run dir: never read through a link, and only a pid's worth.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    (&mut file).take(64).read_to_string(&mut text).map_err(|e| err(e.to_string()))?;
    text.trim().parse().map_err(|_| err(format!("{:?} is not a pid", text.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The child's limits, as its own /proc/self/limits shows them: (soft, hard).
    async fn child_memlock(memlock: u64) -> Result<(String, String), ProcessError> {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let argv = ["-c".to_owned(), "cat /proc/self/limits".to_owned()];
        let setup = ChildSetup { memlock: Some(memlock), ..ChildSetup::default() };
        let child = spawn_with(Path::new("sh"), &argv, &log, &setup)?;
        child.wait_exit(Duration::from_secs(30)).await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let line = text.lines().find(|l| l.starts_with("Max locked memory")).unwrap();
        let mut fields = line.split_whitespace().skip(3);
        Ok((fields.next().unwrap().to_owned(), fields.next().unwrap().to_owned()))
    }

    /// The child runs as the user, with only its groups, and keeps the memlock limit that was
    /// raised while it was still root.
    #[tokio::test]
    async fn the_child_runs_as_the_user_with_the_limit_set_before_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let script = "id -u; id -g; id -G; grep '^Max locked memory' /proc/self/limits";
        let argv = ["-c".to_owned(), script.to_owned()];
        let user = QemuUser { name: "nobody".into(), uid: 65534, gid: 65534, groups: vec![] };
        // Up to the hard limit: raising that needs CAP_SYS_RESOURCE, which root in a container
        // may lack (the test below covers it).
        let bytes = memlock().rlim_max.min(3 << 30);
        let setup = ChildSetup { memlock: Some(bytes), user: Some(&user), inherit: &[] };
        let child = spawn_with(Path::new("sh"), &argv, &log, &setup).unwrap();
        child.wait_exit(Duration::from_secs(30)).await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..3], ["65534", "65534", "65534"], "{text}");
        let soft = lines[3].split_whitespace().nth(3).unwrap();
        let soft: u64 = if soft == "unlimited" { u64::MAX } else { soft.parse().unwrap() };
        assert!(soft >= bytes, "{text}");
    }

    #[tokio::test]
    async fn the_child_gets_the_raised_memlock_and_the_agent_keeps_its_own() {
        let before = memlock();
        // CAP_SYS_RESOURCE (bit 24 of CapEff); root in a container may lack it.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap();
        let privileged = u64::from_str_radix(cap_eff.trim(), 16).unwrap() & (1 << 24) != 0;
        // Past the hard limit: with CAP_SYS_RESOURCE both limits of the child go up;
        // anyone else gets an error that says what to do.
        let past = (1u64 << 40) + 4096;
        if before.rlim_max != libc::RLIM_INFINITY && before.rlim_max < past {
            match child_memlock(past).await {
                Ok(limits) => {
                    assert!(privileged, "raised past the hard limit without privilege");
                    assert_eq!(limits, (past.to_string(), past.to_string()));
                }
                Err(e) => {
                    assert!(!privileged, "{e}");
                    assert!(e.to_string().contains("LimitMEMLOCK"), "{e}");
                }
            }
        }
        // Up to the hard limit anyone may raise the soft one.
        if before.rlim_cur < before.rlim_max {
            let (soft, _) = child_memlock(before.rlim_max).await.unwrap();
            assert_eq!(soft, before.rlim_max.to_string());
        }
        let after = memlock();
        assert_eq!((after.rlim_cur, after.rlim_max), (before.rlim_cur, before.rlim_max));
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
}
