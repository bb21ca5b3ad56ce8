//! One QEMU process as the agent holds it, however it came: spawned by this agent, adopted
//! from a recorded instance's pidfile, or found by a scan of `/proc` (an orphan).
//!
//! Each is pinned by a pidfd, so a signal never reaches a later process that reused the pid,
//! and [`VmProcess::exited`] resolves only once QEMU's last thread is gone. The one ownership
//! rule ([`Owner`]) is checked when it is found and again before every signal. Every way of
//! stopping it is [`VmProcess::stop`] along a [`Ladder`] that the caller picks.

mod ladder;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use ladder::{EXIT_DEADLINE, Ladder, QUIT_GRACE, Stopped};

use super::layout::VmPaths;
use super::process::{self, ProcessError, Spawned};
use super::procfs::ProcRoot;
use super::qmp::Qmp;
use crate::pidfd::PidFd;

/// Time for the reaper task to collect an exit status once the pidfd said QEMU is gone.
const REAP_DEADLINE: Duration = Duration::from_secs(5);

/// Stopping a QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    /// It is still there after SIGKILL and the time the kernel was given to take it.
    #[error(
        "QEMU pid {pid} of instance {id} is still there {} s after SIGKILL; it may hold its \
         GPUs: check the host (`ps -L {pid}`), then try again",
        waited.as_secs()
    )]
    Survived { pid: u32, id: String, waited: Duration },
}

/// Instance `id`'s QEMU of the agent whose run dir is `run_dir`, looked for in `proc`.
///
/// The one ownership rule: the command line carries both `-name qudata-<id>` and
/// `-pidfile <run dir>/vms/<id>/qemu.pid`, and the process has not exited
/// ([`ProcRoot::is_ours`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub proc: ProcRoot,
    pub run_dir: PathBuf,
    pub id: String,
}

impl Owner {
    /// The instance's QMP socket and pidfile (both derive from the run dir alone).
    fn paths(&self) -> VmPaths {
        VmPaths::new(Path::new("/"), &self.run_dir, &self.id)
    }

    /// Whether `pid` is this instance's live QEMU right now.
    fn owns(&self, pid: u32) -> bool {
        self.proc.is_ours(pid, &self.id, &self.run_dir)
    }
}

#[derive(Debug)]
enum Pinned {
    /// This agent's child: reaped in the background, its exit status known.
    Child(Spawned),
    /// Adopted or found by a scan.
    Found(PidFd),
}

/// A QEMU of this agent. Dropping it does not stop QEMU.
pub struct VmProcess {
    pid: u32,
    owner: Owner,
    pinned: Pinned,
    /// The monitor of a VM the agent watches; a stop opens one when it is missing.
    qmp: Option<Arc<Qmp>>,
}

impl VmProcess {
    /// Starts QEMU for `owner` ([`process::spawn_with`]); `argv` carries its marker
    /// and pidfile.
    pub fn spawn(
        owner: Owner,
        binary: &Path,
        argv: &[String],
        log: &Path,
        setup: &process::ChildSetup<'_>,
    ) -> Result<VmProcess, ProcessError> {
        let child = process::spawn_with(binary, argv, log, setup)?;
        Ok(VmProcess { pid: child.pid, owner, pinned: Pinned::Child(child), qmp: None })
    }

    /// A recorded instance's QEMU after an agent restart: the pid in its pidfile, else one
    /// found by its command line (a QEMU whose pidfile was deleted).
    pub fn adopt(owner: &Owner) -> Option<VmProcess> {
        let recorded = process::read_pidfile(&owner.paths().pidfile).ok();
        let pinned = recorded.and_then(|pid| VmProcess::pin(owner, pid));
        pinned.or_else(|| VmProcess::scan(owner).into_iter().next())
    }

    /// Every QEMU of `owner` found by its command line (one, unless something went wrong).
    pub fn scan(owner: &Owner) -> Vec<VmProcess> {
        let found = owner.proc.scan(&owner.run_dir).into_iter();
        let ours = found.filter(|f| f.instance_id == owner.id);
        ours.filter_map(|f| VmProcess::pin(owner, f.pid)).collect()
    }

    /// Pins `pid`, then checks it: a check made while the pinned process has not exited
    /// speaks of it (its pid is not free for another process before it is reaped).
    fn pin(owner: &Owner, pid: u32) -> Option<VmProcess> {
        let pidfd = PidFd::open(pid).ok()?;
        let ours = owner.owns(pid) && !pidfd.has_exited();
        ours.then(|| VmProcess {
            pid,
            owner: owner.clone(),
            pinned: Pinned::Found(pidfd),
            qmp: None,
        })
    }

    /// The same process, with the monitor connection its watcher uses.
    pub fn with_qmp(mut self, qmp: Arc<Qmp>) -> VmProcess {
        self.qmp = Some(qmp);
        self
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn id(&self) -> &str {
        &self.owner.id
    }

    /// The child, when this agent started this QEMU.
    pub fn spawned(&self) -> Option<&Spawned> {
        match &self.pinned {
            Pinned::Child(child) => Some(child),
            Pinned::Found(_) => None,
        }
    }

    /// Whether the process is gone (its last thread), without waiting.
    pub fn has_exited(&self) -> bool {
        self.pidfd().has_exited()
    }

    fn pidfd(&self) -> &PidFd {
        match &self.pinned {
            Pinned::Child(child) => &child.pidfd,
            Pinned::Found(pidfd) => pidfd,
        }
    }

    /// Resolves once QEMU's last thread is gone (see [`PidFd::exited`]): only then has it let
    /// go of its disk and VFIO devices.
    pub async fn exited(&self) {
        self.pidfd().exited().await;
    }

    /// [`VmProcess::exited`] within `limit`; whether it did.
    pub async fn exited_within(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.exited()).await.is_ok()
    }

    /// The exit status of a QEMU this agent started, once it has exited; `None` for one found.
    pub async fn exit_status(&self) -> Option<String> {
        let child = self.spawned()?;
        Some(child.wait_exit(REAP_DEADLINE).await.unwrap_or_else(|e| e.to_string()))
    }

    /// Sends `signal` when the process is still this instance's QEMU (read again now); whether
    /// it was sent.
    fn signal(&self, signal: libc::c_int) -> bool {
        self.owner.owns(self.pid) && self.pidfd().signal(signal).is_ok()
    }
}
