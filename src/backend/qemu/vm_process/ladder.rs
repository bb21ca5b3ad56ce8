//! How a QEMU is stopped: every step in one place, each with a deadline; which steps apply
//! is the caller's [`Ladder`].

use std::sync::Arc;
use std::time::Duration;

use super::{VmProcess, VmProcessError};
use crate::backend::qemu::qmp::Qmp;

/// Time for a monitor to accept and answer when a stop opens one (an orphan's may be stuck).
const QMP_DEADLINE: Duration = Duration::from_secs(5);
/// Time for QEMU to exit after `quit`, and after SIGTERM.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);
/// Time for the kernel to take QEMU after SIGKILL: unpinning the memory of a large guest with
/// passed-through devices takes many seconds, and the GPUs wait for it.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(120);

/// The steps of a stop, in this order: resume a paused guest, ACPI power-down, QMP `quit`,
/// SIGTERM, SIGKILL. A step that does not apply (a guest that is not running gets no power
/// button; a process that is no longer ours, or already exiting, gets no signal) is skipped;
/// one that was taken gets its deadline before the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ladder {
    /// Resume a guest the renter paused, so it can act on the power button.
    pub resume_paused: bool,
    /// Press the power button of a running guest, then wait this long.
    pub powerdown: Option<Duration>,
    /// Tell QEMU to `quit` over its monitor, then wait this long.
    pub quit: Option<Duration>,
    /// Wait this long after SIGTERM.
    pub term: Duration,
    /// Wait this long after SIGKILL: always the last step, also when no signal was needed.
    pub kill: Duration,
}

impl Ladder {
    /// Delete and orphans: the guest gets its power button first.
    pub fn graceful(powerdown: Duration) -> Ladder {
        Ladder {
            resume_paused: false,
            powerdown: Some(powerdown),
            quit: Some(QUIT_GRACE),
            term: QUIT_GRACE,
            kill: EXIT_DEADLINE,
        }
    }

    /// Host maintenance (`recover --stop-all`): the disk is kept for a later boot, so a
    /// paused guest is resumed to shut down cleanly.
    pub fn maintenance(powerdown: Duration) -> Ladder {
        Ladder { resume_paused: true, ..Ladder::graceful(powerdown) }
    }

    /// A failed start or boot: a guest that never came up has nobody to press the button for.
    pub fn abort() -> Ladder {
        Ladder { powerdown: None, ..Ladder::graceful(Duration::ZERO) }
    }
}

/// How a QEMU was stopped (the last step taken), for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It had exited before the stop began.
    NotRunning,
    PoweredDown,
    Quit,
    Terminated,
    Killed,
    /// It was already on its way out (monitor closed, command line gone) and needed no step.
    Exited,
}

impl VmProcess {
    /// Stops QEMU along `ladder`; returns once its last thread is gone. `Err` only when it is
    /// still there after the last step.
    pub async fn stop(&self, ladder: &Ladder) -> Result<Stopped, VmProcessError> {
        if self.pidfd().has_exited() {
            return Ok(Stopped::NotRunning);
        }
        if let Some(how) = self.stop_over_qmp(ladder).await {
            return Ok(how);
        }
        if self.signal(libc::SIGTERM) {
            if self.exited_within(ladder.term).await {
                return Ok(Stopped::Terminated);
            }
            tracing::warn!(pid = self.pid, id = self.id(), "QEMU ignored SIGTERM; sending SIGKILL");
        }
        let how = if self.signal(libc::SIGKILL) { Stopped::Killed } else { Stopped::Exited };
        if self.exited_within(ladder.kill).await {
            return Ok(how);
        }
        let (pid, id) = (self.pid, self.id().to_owned());
        Err(VmProcessError::Survived { pid, id, waited: ladder.kill })
    }

    /// Resume, power-down, `quit`, as the ladder says; `None` when QEMU is still there.
    async fn stop_over_qmp(&self, ladder: &Ladder) -> Option<Stopped> {
        if ladder.powerdown.is_none() && ladder.quit.is_none() {
            return None;
        }
        let qmp = self.monitor().await?;
        let mut running = false;
        if let Ok(status) = qmp.query_status().await {
            running = status.running;
            if !running && ladder.resume_paused && status.status == qapi_qmp::RunState::paused {
                running = qmp.cont().await.is_ok();
            }
        }
        if let Some(grace) = ladder.powerdown
            && running
            && qmp.system_powerdown().await.is_ok()
            && self.exited_within(grace).await
        {
            return Some(Stopped::PoweredDown);
        }
        let grace = ladder.quit?;
        (qmp.quit().await.is_ok() && self.exited_within(grace).await).then_some(Stopped::Quit)
    }

    /// The watched VM's monitor, or a new connection to its socket.
    async fn monitor(&self) -> Option<Arc<Qmp>> {
        if let Some(qmp) = &self.qmp {
            return Some(Arc::clone(qmp));
        }
        let paths = self.owner.paths();
        let connect = Qmp::connect(paths.monitor(), QMP_DEADLINE);
        tokio::time::timeout(QMP_DEADLINE, connect).await.ok()?.ok().map(Arc::new)
    }
}
