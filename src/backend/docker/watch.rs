//! Watching one container by polling the engine (each poll with a deadline): an exit nobody
//! asked for becomes [`BackendEvent::Exited`] with the exit code and the last log lines; a
//! container running again on its own (restart policy, engine back) becomes
//! [`BackendEvent::Started`], so the manager configures it again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::models::{ContainerState, ContainerStateStatusEnum};
use tokio::task::JoinHandle;

use super::engine::Engine;
use super::error::DockerError;
use crate::backend::{BackendEvent, EventSink};

const POLL: Duration = Duration::from_millis(500);

/// A running watch. Dropping it stops the watch.
pub struct Watch {
    /// Set while the backend itself stops or restarts the container.
    quiet: AtomicBool,
    /// `StartedAt` of the run the manager knows about.
    started_at: Mutex<Option<String>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().expect("watch task").take() {
            task.abort();
        }
    }
}

impl Watch {
    /// Starts watching `name`. `known_down`: the manager already holds an error for it.
    pub fn spawn(
        engine: Engine,
        id: String,
        name: String,
        events: EventSink,
        started_at: Option<String>,
        known_down: bool,
    ) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            quiet: AtomicBool::new(false),
            started_at: Mutex::new(started_at),
            task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&watch);
        let task = tokio::spawn(async move {
            let mut down = known_down;
            loop {
                tokio::time::sleep(POLL).await;
                let Some(watch) = weak.upgrade() else { return };
                if watch.quiet.load(Ordering::SeqCst) {
                    continue;
                }
                let seen = engine.inspect(&name).await;
                if watch.quiet.load(Ordering::SeqCst) {
                    continue; // an operation began meanwhile; what we saw may be its doing
                }
                let event = match seen {
                    Err(DockerError::NotFound { .. }) => {
                        let reason = format!("the container {name} was removed outside the agent");
                        let _ = events.send(BackendEvent::Exited { id: id.clone(), reason });
                        return;
                    }
                    Err(e) if !down => {
                        let reason =
                            format!("{e}; the container runs again when the engine is back");
                        Some(BackendEvent::Exited { id: id.clone(), reason })
                    }
                    Err(_) => None,
                    Ok(info) => {
                        let state = info.state.unwrap_or_default();
                        watch.judge(&engine, &id, &name, &state, down).await
                    }
                };
                if let Some(event) = event {
                    down = matches!(event, BackendEvent::Exited { .. });
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        *watch.task.lock().expect("watch task") = Some(task);
        watch
    }

    async fn judge(
        &self,
        engine: &Engine,
        id: &str,
        name: &str,
        state: &ContainerState,
        down: bool,
    ) -> Option<BackendEvent> {
        if is_up(state) {
            let restarted = {
                let mut known = self.started_at.lock().expect("started_at");
                let restarted = state.started_at != *known;
                *known = state.started_at.clone();
                restarted
            };
            if down {
                return Some(BackendEvent::Started { id: id.to_owned() });
            }
            if !restarted {
                return None;
            }
            // It exited and its restart policy ran it again between two polls: report the
            // exit, and the new run at the next poll.
            let logs = engine.logs_tail(name, 5).await;
            let mut reason =
                "the container's command exited and the restart policy ran it again".to_owned();
            if !logs.is_empty() {
                reason.push_str(&format!("; last output: {logs}"));
            }
            return Some(BackendEvent::Exited { id: id.to_owned(), reason });
        }
        if down {
            return None;
        }
        let logs = engine.logs_tail(name, 5).await;
        Some(BackendEvent::Exited { id: id.to_owned(), reason: exit_reason(state, &logs) })
    }

    /// Runs `op` without reporting what it does to the container, then takes the run it
    /// leaves as the known one.
    pub async fn quietly<T>(&self, engine: &Engine, name: &str, op: impl Future<Output = T>) -> T {
        self.quiet.store(true, Ordering::SeqCst);
        let out = op.await;
        if let Ok(info) = engine.inspect(name).await {
            *self.started_at.lock().expect("started_at") = info.state.and_then(|s| s.started_at);
        }
        self.quiet.store(false, Ordering::SeqCst);
        out
    }

    pub fn set_quiet(&self) {
        self.quiet.store(true, Ordering::SeqCst);
    }
}

/// Running (paused counts: the process is there) and not between two restarts.
pub fn is_up(state: &ContainerState) -> bool {
    state.running == Some(true) && state.restarting != Some(true)
}

/// One sentence on why a container is not running: status, exit code, OOM, last log lines.
pub fn exit_reason(state: &ContainerState, logs: &str) -> String {
    let code = state.exit_code.unwrap_or(-1);
    let mut reason = match state.status {
        Some(ContainerStateStatusEnum::DEAD) => format!("the container is dead (exit code {code})"),
        Some(ContainerStateStatusEnum::RESTARTING) => {
            format!("the container exited with code {code} and is being restarted")
        }
        Some(ContainerStateStatusEnum::CREATED) => "the container was created but never ran".into(),
        _ => format!("the container exited with code {code}"),
    };
    if state.oom_killed == Some(true) {
        reason.push_str(" (killed: out of memory)");
    }
    if let Some(error) = state.error.as_deref().filter(|e| !e.is_empty()) {
        reason.push_str(&format!(": {error}"));
    }
    if !logs.is_empty() {
        reason.push_str(&format!("; last output: {logs}"));
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_carry_code_memory_and_logs() {
        let state = ContainerState {
            status: Some(ContainerStateStatusEnum::EXITED),
            exit_code: Some(3),
            oom_killed: Some(true),
            ..Default::default()
        };
        assert_eq!(
            exit_reason(&state, "boom | bye"),
            "the container exited with code 3 (killed: out of memory); last output: boom | bye"
        );
        let restarting = ContainerState {
            status: Some(ContainerStateStatusEnum::RESTARTING),
            running: Some(true),
            restarting: Some(true),
            exit_code: Some(1),
            ..Default::default()
        };
        assert!(!is_up(&restarting));
        assert_eq!(
            exit_reason(&restarting, ""),
            "the container exited with code 1 and is being restarted"
        );
        let paused =
            ContainerState { running: Some(true), paused: Some(true), ..Default::default() };
        assert!(is_up(&paused));
    }
}
