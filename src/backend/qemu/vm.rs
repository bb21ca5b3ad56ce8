//! One running QEMU as the backend holds it: the QMP connection, the process, and a watcher that
//! turns a VM that stopped working without being asked (QEMU exited, KVM's `internal-error`,
//! a guest panic, a disk error) into a [`VmExit`] with QEMU's or the console's own words, and
//! a [`BackendEvent::Exited`] for the manager.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use super::accel::kvm_failure;
use super::layout::VmPaths;
use super::qmp::{Qmp, QmpEvent};
use super::vm_process::VmProcess;
use crate::backend::{BackendEvent, EventSink};

/// QMP calls are local and quick; a monitor that does not answer in this time is stuck.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Serial lines quoted when a VM stops on its own.
const SERIAL_LINES: usize = 3;
/// How much of `qemu.log` is read for QEMU's last words.
const QEMU_LOG_TAIL: u64 = 16 << 10;
/// Time for QEMU to be gone once its monitor closed.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(30);
/// The serial log's cap on disk, how much of its tail is kept when it is cut, and how often
/// its size is looked at (the guest writes as much as it likes).
const SERIAL_MAX: u64 = 4 << 20;
const SERIAL_KEEP: u64 = 256 << 10;
const SERIAL_CHECK: Duration = Duration::from_secs(5);

/// Why a VM stopped working.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitCause {
    /// The guest powered itself off.
    GuestPoweroff,
    /// KVM could not run the guest (QEMU's words in `detail`).
    Kvm { detail: String },
    /// The guest kernel panicked.
    GuestPanic,
    /// QEMU stopped the VM on a disk I/O error.
    DiskError,
    /// QEMU exited or stopped the VM for another reason.
    Qemu,
}

/// A VM that is gone or stopped for good, and one sentence saying why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    pub cause: ExitCause,
    pub reason: String,
}

/// A live VM.
pub struct Vm {
    pub id: String,
    pub process: VmProcess,
    pub qmp: Arc<Qmp>,
    /// Where this QEMU's own output starts in `qemu.log` (appended to across starts).
    log_start: u64,
    /// Where this boot's console output starts in `serial.log` (QEMU truncates it at start;
    /// a reset continues it).
    boot_offset: AtomicU64,
    /// Set before the agent stops QEMU itself, so that exit is not reported as a crash.
    stopping: AtomicBool,
    /// `(a boot is being watched, QEMU is gone)`, changed together: while a boot is watched,
    /// its watcher reports the exit (and may boot the VM again under TCG), so no event goes
    /// to the manager.
    boot_watch: std::sync::Mutex<(bool, bool)>,
    /// `Some` once QEMU is gone.
    exited: watch::Receiver<Option<VmExit>>,
}

impl Vm {
    /// Watches `qmp` and the process until QEMU exits.
    pub fn watch(process: VmProcess, qmp: Qmp, paths: VmPaths, events: EventSink) -> Arc<Vm> {
        let (tx, exited) = watch::channel(None);
        // A QEMU this agent started has its own output from its start on; an adopted one
        // from now on.
        let spawned = process.spawned();
        let boot_offset = if spawned.is_some() { 0 } else { paths.serial_len() };
        let log_start = spawned.map_or_else(|| paths.qemu_log_len(), |s| s.log_start);
        let qmp = Arc::new(qmp);
        let vm = Arc::new(Vm {
            id: process.id().to_owned(),
            process: process.with_qmp(Arc::clone(&qmp)),
            qmp,
            log_start,
            boot_offset: AtomicU64::new(boot_offset),
            stopping: AtomicBool::new(false),
            boot_watch: std::sync::Mutex::new((false, false)),
            exited,
        });
        tokio::spawn(cap_serial_log(Arc::clone(&vm), paths.clone()));
        let watched = Arc::clone(&vm);
        tokio::spawn(async move {
            let exit = watched.wait_for_exit(&paths).await;
            let watched_boot = {
                let mut boot = watched.boot_watch.lock().unwrap_or_else(|e| e.into_inner());
                boot.1 = true;
                boot.0
            };
            let _ = tx.send(Some(exit.clone()));
            if watched.stopping.load(Ordering::SeqCst) {
                tracing::info!(id = %watched.id, "QEMU stopped");
                return;
            }
            tracing::warn!(id = %watched.id, reason = %exit.reason, "the VM stopped on its own");
            if watched_boot {
                return;
            }
            let _ =
                events.send(BackendEvent::Exited { id: watched.id.clone(), reason: exit.reason });
        });
        vm
    }

    /// Follows QMP until the connection drops, telling QEMU to quit when its run state shows
    /// the VM cannot go on; then waits for the process and says why it went.
    async fn wait_for_exit(&self, paths: &VmPaths) -> VmExit {
        let mut events = self.qmp.subscribe();
        let mut shutdown: Option<(bool, String)> = None;
        let mut failed: Option<ExitCause> = None;
        loop {
            let event = tokio::select! {
                _ = self.qmp.closed() => break,
                event = events.recv() => event,
            };
            let cause = match event {
                Ok(QmpEvent::Shutdown { guest, reason }) => {
                    if reason == "guest-panic" {
                        failed.get_or_insert(ExitCause::GuestPanic);
                    }
                    shutdown = Some((guest, reason));
                    None
                }
                Ok(QmpEvent::GuestPanicked) => Some(ExitCause::GuestPanic),
                Ok(QmpEvent::Stop) => self.stopped_for_good(paths).await,
                Ok(_) | Err(RecvError::Lagged(_)) => None,
                Err(RecvError::Closed) => break,
            };
            if let Some(cause) = cause
                && failed.is_none()
            {
                tracing::warn!(id = %self.id, ?cause, "the VM cannot go on; telling QEMU to quit");
                failed = Some(cause);
                // The VM is dead either way; a QEMU that exits frees what it holds and lets
                // `start` boot the VM again from its disk.
                let _ = self.qmp.quit().await;
            }
        }
        let status = if self.process.exited_within(EXIT_AFTER_CLOSE).await {
            let status = self.process.exit_status().await;
            status.unwrap_or_else(|| "not known (QEMU was adopted)".into())
        } else {
            "still running after closing its monitor".into()
        };
        let said = paths.qemu_log_since(self.log_start, QEMU_LOG_TAIL);
        describe(failed, shutdown, &status, &said, paths)
    }

    /// After a `STOP` event: the cause when the run state is one the VM cannot leave.
    async fn stopped_for_good(&self, paths: &VmPaths) -> Option<ExitCause> {
        let state = self.qmp.query_status().await.ok()?.status;
        match state {
            qapi_qmp::RunState::internal_error => {
                let said = paths.qemu_log_since(self.log_start, QEMU_LOG_TAIL);
                let detail = kvm_failure(&said).unwrap_or_else(|| "internal error".to_owned());
                Some(ExitCause::Kvm { detail })
            }
            qapi_qmp::RunState::guest_panicked => Some(ExitCause::GuestPanic),
            qapi_qmp::RunState::io_error => Some(ExitCause::DiskError),
            _ => None,
        }
    }

    /// Marks the coming exit as asked for.
    pub fn expect_exit(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Why QEMU is gone, or `None` while it runs.
    pub fn exit_reason(&self) -> Option<String> {
        self.exited.borrow().as_ref().map(|exit| exit.reason.clone())
    }

    /// Resolves once the VM has stopped for good, with why: its QEMU gone
    /// ([`VmProcess::exited`]), or its monitor closed and QEMU not gone in time.
    pub async fn exited(&self) -> VmExit {
        let mut exited = self.exited.clone();
        match exited.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone().expect("waited for Some"),
            Err(_) => VmExit { cause: ExitCause::Qemu, reason: "the VM watcher stopped".into() },
        }
    }

    /// Marks a boot as watched (`true`) or no longer (`false`): while watched, an exit is
    /// reported only to the watcher of the boot. Returns whether QEMU is gone, so the end of
    /// a watch never misses an exit that was kept from the manager.
    pub fn set_booting(&self, booting: bool) -> bool {
        let mut boot = self.boot_watch.lock().unwrap_or_else(|e| e.into_inner());
        boot.0 = booting;
        boot.1
    }

    /// Where the current boot's console output starts in `serial.log`.
    pub fn boot_offset(&self) -> u64 {
        self.boot_offset.load(Ordering::SeqCst)
    }

    /// A reset starts a new boot at the console's current end.
    pub fn mark_reboot(&self, paths: &VmPaths) {
        self.boot_offset.store(paths.serial_len(), Ordering::SeqCst);
    }
}

/// Keeps the VM's serial log under [`SERIAL_MAX`] until QEMU is gone.
async fn cap_serial_log(vm: Arc<Vm>, paths: VmPaths) {
    loop {
        tokio::select! {
            _ = vm.exited() => return,
            () = tokio::time::sleep(SERIAL_CHECK) => {}
        }
        let log = paths.clone();
        let cut = tokio::task::spawn_blocking(move || log.cap_serial_log(SERIAL_MAX, SERIAL_KEEP));
        match cut.await {
            Ok(Ok(true)) => tracing::debug!(id = %vm.id, "serial log cut at its cap"),
            Ok(Err(e)) => tracing::warn!(id = %vm.id, error = %e, "cannot cut the serial log"),
            _ => {}
        }
    }
}

/// One sentence for how the VM went, in QEMU's or the console's words.
fn describe(
    failed: Option<ExitCause>,
    shutdown: Option<(bool, String)>,
    status: &str,
    said: &str,
    paths: &VmPaths,
) -> VmExit {
    let console = paths.serial_tail(SERIAL_LINES);
    let with_console = |what: String| {
        if console.is_empty() { what } else { format!("{what}; last console lines: {console}") }
    };
    let (cause, what) = match (failed, shutdown) {
        (Some(ExitCause::Kvm { detail }), _) => {
            let what = format!(
                "QEMU stopped the VM: {detail}; KVM cannot run this guest on this host \
                 (nested virtualisation or a KVM bug)"
            );
            (ExitCause::Kvm { detail }, what)
        }
        (Some(ExitCause::GuestPanic), _) => {
            // The panic line, not the register dump after it.
            let tail = super::layout::read_tail(&paths.serial_log, 16 << 10);
            let what = match super::console::failure_in(tail.as_bytes()) {
                Some(failure) => {
                    format!("the guest kernel panicked; console: {}", failure.lines.join(" | "))
                }
                None => with_console("the guest kernel panicked".to_owned()),
            };
            (ExitCause::GuestPanic, what)
        }
        (Some(ExitCause::DiskError), _) => (
            ExitCause::DiskError,
            "QEMU stopped the VM on a disk I/O error; check the host's disk (full?)".to_owned(),
        ),
        (Some(cause), _) => (cause, with_console(format!("QEMU stopped the VM ({status})"))),
        (None, Some((true, _))) => {
            (ExitCause::GuestPoweroff, with_console("the guest powered itself off".to_owned()))
        }
        (None, Some((false, reason))) => (
            ExitCause::Qemu,
            with_console(format!("QEMU shut the VM down ({reason}); exit status {status}")),
        ),
        (None, None) => {
            let last = said.lines().rev().map(str::trim).find(|l| !l.is_empty());
            let what = match (kvm_failure(said), last) {
                (Some(detail), _) => {
                    let what = format!("QEMU exited: {detail} (exit status {status})");
                    return VmExit { cause: ExitCause::Kvm { detail }, reason: what };
                }
                (None, Some(last)) => {
                    format!("QEMU exited unexpectedly (exit status {status}): {last}")
                }
                (None, None) => format!("QEMU exited unexpectedly (exit status {status})"),
            };
            (ExitCause::Qemu, with_console(what))
        }
    };
    VmExit { cause, reason: what }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths_with(serial: &str) -> (tempfile::TempDir, VmPaths) {
        let root = tempfile::tempdir().unwrap();
        let p = VmPaths::new(&root.path().join("d"), &root.path().join("r"), "x");
        std::fs::create_dir_all(&p.dir).unwrap();
        std::fs::write(&p.serial_log, serial).unwrap();
        (root, p)
    }

    #[test]
    fn each_way_a_vm_goes_has_its_sentence() {
        let (_root, p) = paths_with("boot\nKernel panic - not syncing: Attempted to kill init!\n");
        let exit = describe(Some(ExitCause::GuestPanic), None, "exit status: 0", "", &p);
        assert_eq!(
            exit.reason,
            "the guest kernel panicked; console: boot | Kernel panic - not syncing: Attempted to \
             kill init!"
        );
        let kvm = ExitCause::Kvm { detail: "KVM internal error (emulation failure)".into() };
        let exit = describe(Some(kvm.clone()), None, "signal: 9", "", &p);
        assert_eq!(exit.cause, kvm);
        assert!(exit.reason.starts_with("QEMU stopped the VM: KVM internal error (emulation failure); KVM cannot run this guest"), "{}", exit.reason);

        let (_root, p) = paths_with("");
        let said = "qemu-system-x86_64: failed to initialize kvm: Permission denied\n";
        let exit = describe(None, None, "exit status: 1", said, &p);
        assert_eq!(
            exit.cause,
            ExitCause::Kvm { detail: "failed to initialize kvm: Permission denied".into() }
        );
        let said = "qemu-system-x86_64: terminating on signal 15 from pid 7\n";
        let exit = describe(None, None, "exit status: 0", said, &p);
        assert_eq!(
            exit.reason,
            "QEMU exited unexpectedly (exit status exit status: 0): qemu-system-x86_64: terminating on signal 15 from pid 7"
        );
        let exit = describe(None, Some((true, "guest-shutdown".into())), "exit status: 0", "", &p);
        assert_eq!(
            (exit.cause, exit.reason.as_str()),
            (ExitCause::GuestPoweroff, "the guest powered itself off")
        );
    }
}
