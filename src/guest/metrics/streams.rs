//! The metrics streams of every running VM, by instance: started when the guest is configured
//! (after every boot, reset and adoption), replaced when started again, stopped with the VM.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::board::GuestGpuBoard;
use super::stream::{self, StreamSpec};

/// Time a stream gets to close its SSH channel when told to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Owned by the VM backend; the board is shared with the stats loop.
pub struct GpuStreams {
    board: GuestGpuBoard,
    running: Mutex<HashMap<String, Running>>,
}

impl GpuStreams {
    pub fn new(board: GuestGpuBoard) -> GpuStreams {
        GpuStreams { board, running: Mutex::default() }
    }

    pub fn board(&self) -> &GuestGpuBoard {
        &self.board
    }

    /// Starts (or restarts) the stream of `spec`'s instance; it ends by itself when `gone`
    /// resolves (the VM exited).
    pub fn start(&self, spec: StreamSpec, gone: impl Future<Output = ()> + Send + 'static) {
        let id = spec.session.target().instance.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(stream::run(spec, self.board.clone(), stopped, Box::pin(gone)));
        let previous =
            self.running.lock().expect("streams lock").insert(id, Running { stop, task });
        if let Some(old) = previous {
            let _ = old.stop.send(true);
        }
    }

    /// Stops an instance's stream and waits for it to close its channel; a no-op when
    /// none runs.
    pub async fn stop(&self, instance: &str) {
        let running = self.running.lock().expect("streams lock").remove(instance);
        if let Some(Running { stop, mut task }) = running {
            let _ = stop.send(true);
            // The stream answers `stop` at once; the limit guards against a stuck close.
            if tokio::time::timeout(STOP_DEADLINE, &mut task).await.is_err() {
                task.abort();
                tracing::warn!(%instance, "GPU metrics stream did not stop in time; aborted");
            }
        }
        self.board.clear(instance);
    }

    /// Instances with a stream task still running.
    pub fn active(&self) -> Vec<String> {
        let running = self.running.lock().expect("streams lock");
        running.iter().filter(|(_, r)| !r.task.is_finished()).map(|(id, _)| id.clone()).collect()
    }
}
