//! Stopping a QEMU of this agent that no record claims (PROTOCOL.md §4): ACPI power-down over
//! its monitor, then `quit`, then SIGTERM and SIGKILL, each with a deadline. Every signal goes
//! to a pid whose command line was just checked again ([`ProcRoot::is_ours`]).

use std::path::Path;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};

use super::layout::VmPaths;
use super::procfs::ProcRoot;
use super::qmp::Qmp;

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(50);
/// Time for a monitor to accept and answer; an orphan's may be stuck.
const QMP_DEADLINE: Duration = Duration::from_secs(5);
/// Time for QEMU to exit after `quit`, and after SIGTERM.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// Time for the kernel to take a process after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// How an orphan was stopped, for logs and `recover`'s table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Nothing of ours was running.
    NotRunning,
    PoweredDown,
    Quit,
    Terminated,
    Killed,
}

/// Where an orphan lives and how long its guest may take to power down.
pub struct Orphan<'a> {
    pub proc: &'a ProcRoot,
    pub run_dir: &'a Path,
    pub paths: &'a VmPaths,
    pub id: &'a str,
    pub powerdown_grace: Duration,
    /// Resume a guest the renter paused so it can act on the power button: set when the
    /// record is kept (host maintenance), where a clean shutdown protects the renter's disk.
    pub resume_paused: bool,
}

impl Orphan<'_> {
    fn pids(&self) -> Vec<u32> {
        let found = self.proc.scan(self.run_dir).into_iter();
        found.filter(|f| f.instance_id == self.id).map(|f| f.pid).collect()
    }

    async fn all_gone(&self, pids: &[u32], limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            // Gone means no longer alive (exited, or a zombie), not merely "its command line
            // no longer reads as ours": an exiting process shows an empty command line while
            // it still holds its files (a VFIO device, the disk).
            if !pids.iter().any(|pid| self.proc.is_alive(*pid)) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            sleep(POLL).await;
        }
    }

    fn signal(&self, pids: &[u32], sig: libc::c_int) {
        for pid in pids {
            if self.proc.is_ours(*pid, self.id, self.run_dir) {
                // SAFETY: kill(2) only sends a signal, to a pid whose command line was just
                // checked to be this orphan's QEMU.
                unsafe { libc::kill(*pid as libc::pid_t, sig) };
            }
        }
    }

    /// Stops the orphan; `Err` only when it survived SIGKILL.
    pub async fn stop(&self) -> Result<Stopped, String> {
        let pids = self.pids();
        if pids.is_empty() {
            return Ok(Stopped::NotRunning);
        }
        if let Some(how) = self.stop_over_qmp(&pids).await {
            return Ok(how);
        }
        self.signal(&pids, libc::SIGTERM);
        if self.all_gone(&pids, QUIT_GRACE).await {
            return Ok(Stopped::Terminated);
        }
        tracing::warn!(id = self.id, ?pids, "orphan QEMU ignored SIGTERM; sending SIGKILL");
        self.signal(&pids, libc::SIGKILL);
        if self.all_gone(&pids, KILL_GRACE).await {
            return Ok(Stopped::Killed);
        }
        Err(format!("QEMU pid(s) {pids:?} still run after SIGKILL"))
    }

    /// Power-down when the guest runs (a paused or never-started guest cannot act on the
    /// button; a paused one is resumed first with `resume_paused`), then `quit`. `None` when
    /// the monitor cannot do it.
    async fn stop_over_qmp(&self, pids: &[u32]) -> Option<Stopped> {
        let qmp =
            timeout(QMP_DEADLINE, Qmp::connect(&self.paths.qmp, QMP_DEADLINE)).await.ok()?.ok()?;
        let mut running = false;
        if let Ok(status) = qmp.query_status().await {
            running = status.running;
            if !running && self.resume_paused && status.status == qapi_qmp::RunState::paused {
                running = qmp.cont().await.is_ok();
            }
        }
        if running
            && qmp.system_powerdown().await.is_ok()
            && self.all_gone(pids, self.powerdown_grace).await
        {
            return Some(Stopped::PoweredDown);
        }
        let quit = qmp.quit().await.is_ok();
        (quit && self.all_gone(pids, QUIT_GRACE).await).then_some(Stopped::Quit)
    }
}
