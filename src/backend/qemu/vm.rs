//! One running QEMU as the backend holds it: the QMP connection, the pid, and a watcher that
//! turns an exit nobody asked for into a [`BackendEvent::Exited`] with a reason a user can read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::layout::VmPaths;
use super::process::{self, Spawned};
use super::qmp::{Qmp, QmpEvent};
use crate::backend::{BackendEvent, EventSink};

/// QMP calls are local and quick; a monitor that does not answer in this time is stuck.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Serial lines quoted when a VM stops on its own.
const SERIAL_LINES: usize = 3;

/// A live VM.
pub struct Vm {
    pub id: String,
    pub pid: u32,
    pub qmp: Arc<Qmp>,
    /// Set before the agent stops QEMU itself, so that exit is not reported as a crash.
    stopping: AtomicBool,
    /// `Some(reason)` once QEMU is gone.
    exited: watch::Receiver<Option<String>>,
}

impl Vm {
    /// Watches `qmp` and the process until QEMU exits. `spawned` is the child when this agent
    /// started QEMU (its exit status is known); `None` after adoption.
    pub fn watch(
        id: &str,
        pid: u32,
        qmp: Qmp,
        spawned: Option<Spawned>,
        paths: VmPaths,
        events: EventSink,
    ) -> Arc<Vm> {
        let (tx, exited) = watch::channel(None);
        let vm = Arc::new(Vm {
            id: id.to_owned(),
            pid,
            qmp: Arc::new(qmp),
            stopping: AtomicBool::new(false),
            exited,
        });
        let watched = Arc::clone(&vm);
        tokio::spawn(async move {
            let reason = watched.wait_for_exit(spawned, &paths).await;
            let _ = tx.send(Some(reason.clone()));
            if watched.stopping.load(Ordering::SeqCst) {
                tracing::info!(id = %watched.id, "QEMU stopped");
                return;
            }
            tracing::warn!(id = %watched.id, %reason, "QEMU exited on its own");
            let _ = events.send(BackendEvent::Exited { id: watched.id.clone(), reason });
        });
        vm
    }

    /// Waits for the QMP connection to drop and the process to go, then says why it went.
    async fn wait_for_exit(&self, spawned: Option<Spawned>, paths: &VmPaths) -> String {
        let mut events = self.qmp.subscribe();
        let mut shutdown: Option<(bool, String)> = None;
        loop {
            tokio::select! {
                _ = self.qmp.closed() => break,
                event = events.recv() => match event {
                    Ok(QmpEvent::Shutdown { guest, reason }) => shutdown = Some((guest, reason)),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        let status = match spawned {
            Some(mut child) => child
                .wait_exit(Duration::from_secs(30))
                .await
                .unwrap_or_else(|_| "still running after closing its monitor".into()),
            None => {
                wait_gone(self.pid, Duration::from_secs(30)).await;
                "not known (QEMU was adopted)".into()
            }
        };
        let what = match shutdown {
            Some((true, _)) => "the guest powered itself off".to_owned(),
            Some((false, reason)) => {
                format!("QEMU shut the VM down ({reason}); exit status {status}")
            }
            None => format!("QEMU exited unexpectedly (exit status {status})"),
        };
        match paths.serial_tail(SERIAL_LINES) {
            tail if tail.is_empty() => what,
            tail => format!("{what}; last console lines: {tail}"),
        }
    }

    /// Marks the coming exit as asked for.
    pub fn expect_exit(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Why QEMU is gone, or `None` while it runs.
    pub fn exit_reason(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// Resolves once QEMU is gone, with the reason.
    pub async fn exited(&self) -> String {
        let mut exited = self.exited.clone();
        match exited.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the VM watcher stopped".into(),
        }
    }

    /// Waits up to `limit` for QEMU to be gone.
    pub async fn wait_exited(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.exited()).await.is_ok()
    }
}

async fn wait_gone(pid: u32, limit: Duration) {
    let until = tokio::time::Instant::now() + limit;
    while process::is_alive(pid) && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
