//! Keeps one frpc running: restarts it on exit with exponential back-off, adopts the frpc an
//! earlier agent started, and stops it only on an explicit `shutdown`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::TunnelError;
use super::process;
use crate::pidfd::PidFd;

/// Restart policy (PROTOCOL.md §3: 1 s doubling to 60 s, reset after a minute of running).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub healthy_after: Duration,
}

impl Backoff {
    pub const PRODUCTION: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
        healthy_after: Duration::from_secs(60),
    };

    /// The wait before the next start, given the previous wait and how long frpc ran.
    pub fn next_delay(&self, previous: Option<Duration>, uptime: Duration) -> Duration {
        match previous {
            Some(prev) if uptime < self.healthy_after => (prev * 2).min(self.max),
            _ => self.base,
        }
    }
}

/// What the supervisor needs to run frpc.
#[derive(Clone, Debug)]
pub struct SupervisorOptions {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub backoff: Backoff,
}

/// How `Supervisor::start` got its frpc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    Spawned(u32),
    Adopted(u32),
}

#[derive(Default)]
struct State {
    pid: Option<u32>,
    restarts: u64,
}

enum Command {
    Restart(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// The running frpc: our child, or one adopted from an earlier agent.
enum Running {
    Child(tokio::process::Child),
    Adopted(u32, PidFd),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id().unwrap_or_default(),
            Running::Adopted(pid, _) => *pid,
        }
    }

    async fn exited(&mut self) -> String {
        match self {
            Running::Child(c) => match c.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            },
            Running::Adopted(_, fd) => {
                fd.exited().await;
                "exited".to_owned()
            }
        }
    }

    /// SIGTERM to the group, SIGKILL after the grace period; returns once it is gone.
    async fn stop(&mut self) {
        let pid = self.pid();
        process::signal_group(pid, libc::SIGTERM);
        if tokio::time::timeout(process::STOP_GRACE, self.exited()).await.is_err() {
            tracing::warn!(pid, "frpc ignored SIGTERM; killing it");
            process::signal_group(pid, libc::SIGKILL);
            let _ = tokio::time::timeout(process::STOP_GRACE, self.exited()).await;
        }
    }
}

/// Handle on the supervision task. Dropping it leaves frpc running (agent exit or restart).
pub struct Supervisor {
    state: Arc<Mutex<State>>,
    control: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
    logs: JoinHandle<()>,
    run_dir: PathBuf,
}

fn spawn_frpc(opts: &SupervisorOptions) -> Result<Running, TunnelError> {
    let child = process::spawn(&opts.binary, &opts.config, &opts.run_dir)
        .map_err(|source| TunnelError::Spawn { binary: opts.binary.clone(), source })?;
    tracing::info!(pid = child.id(), binary = %opts.binary.display(), "frpc started");
    Ok(Running::Child(child))
}

/// Stops every frpc of ours that is not the adopted one (SIGTERM, then SIGKILL after
/// [`process::STOP_GRACE`]), each pinned by a pidfd so a recycled pid is never signalled.
async fn stop_stale(config: &std::path::Path, adopted: Option<u32>) {
    for pid in process::find_stale(config, adopted) {
        let Ok(fd) = PidFd::open(pid) else { continue };
        // Checked again once pinned.
        if !process::find_stale(config, adopted).contains(&pid) {
            continue;
        }
        tracing::warn!(
            pid,
            "an frpc with this agent's config runs but cannot be adopted; stopping it"
        );
        let _ = fd.signal(libc::SIGTERM);
        if tokio::time::timeout(process::STOP_GRACE, fd.exited()).await.is_err() {
            let _ = fd.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(process::STOP_GRACE, fd.exited()).await;
        }
    }
}

impl Supervisor {
    /// Adopts the frpc recorded in the run dir if it is ours and alive, else starts one.
    pub async fn start(opts: SupervisorOptions) -> Result<(Supervisor, Started), TunnelError> {
        crate::fsutil::ensure_private_dir(&opts.run_dir)?;
        let adopted = process::find_running(&opts.binary, &opts.config, &opts.run_dir)
            .and_then(|pid| PidFd::open(pid).ok().map(|fd| (pid, fd)))
            // Re-check after the pidfd pins the process, so a recycled pid is never adopted.
            .filter(|(pid, _)| {
                process::find_running(&opts.binary, &opts.config, &opts.run_dir) == Some(*pid)
            });
        let adopted_pid = adopted.as_ref().map(|(pid, _)| *pid);
        stop_stale(&opts.config, adopted_pid).await;
        let (running, started) = match adopted {
            Some((pid, fd)) => {
                tracing::info!(pid, "adopted the running frpc");
                (Running::Adopted(pid, fd), Started::Adopted(pid))
            }
            None => {
                let running = spawn_frpc(&opts)?;
                let pid = running.pid();
                (running, Started::Spawned(pid))
            }
        };
        let state = Arc::new(Mutex::new(State { pid: Some(running.pid()), restarts: 0 }));
        let (control, rx) = mpsc::unbounded_channel();
        let fresh = matches!(started, Started::Spawned(_));
        let logs = tokio::spawn(super::logs::forward(process::log_file(&opts.run_dir), fresh));
        let run_dir = opts.run_dir.clone();
        let task = tokio::spawn(supervise(opts, running, state.clone(), rx));
        Ok((Supervisor { state, control, task, logs, run_dir }, started))
    }

    /// The frpc pid now (None while waiting out a back-off).
    pub fn pid(&self) -> Option<u32> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).pid
    }

    /// Restarts after an unexpected exit so far.
    pub fn restarts(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).restarts
    }

    /// Stops frpc and starts it again at once (the main file changed).
    pub async fn restart(&self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Command::Restart(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops frpc for good (teardown) and removes its pidfile.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
        let _ = std::fs::remove_file(process::pidfile(&self.run_dir));
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
        self.logs.abort();
    }
}

async fn supervise(
    opts: SupervisorOptions,
    mut running: Running,
    state: Arc<Mutex<State>>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let set_pid = |pid: Option<u32>| state.lock().unwrap_or_else(|e| e.into_inner()).pid = pid;
    let mut delay: Option<Duration> = None;
    let mut since = Instant::now();
    loop {
        let mut restart_ack = None;
        tokio::select! {
            how = running.exited() => {
                set_pid(None);
                let uptime = since.elapsed();
                let wait = opts.backoff.next_delay(delay, uptime);
                delay = Some(wait);
                tracing::warn!(how, uptime_s = uptime.as_secs(), wait_ms = wait.as_millis() as u64,
                    "frpc exited; restarting after back-off");
                if !back_off(wait, &mut rx, &mut restart_ack).await {
                    return;
                }
                state.lock().unwrap_or_else(|e| e.into_inner()).restarts += 1;
            }
            cmd = rx.recv() => match cmd {
                Some(Command::Stop(ack)) => {
                    running.stop().await;
                    set_pid(None);
                    tracing::info!("frpc stopped");
                    let _ = ack.send(());
                    return;
                }
                Some(Command::Restart(ack)) => {
                    running.stop().await;
                    delay = None;
                    restart_ack = Some(ack);
                }
                None => return,
            },
        }
        // Start again; a failed start counts as an instant exit and backs off the same way.
        loop {
            match spawn_frpc(&opts) {
                Ok(r) => {
                    running = r;
                    break;
                }
                Err(e) => {
                    let wait = opts.backoff.next_delay(delay, Duration::ZERO);
                    delay = Some(wait);
                    tracing::error!(error = %e, wait_ms = wait.as_millis() as u64, "cannot start frpc");
                    if !back_off(wait, &mut rx, &mut restart_ack).await {
                        return;
                    }
                }
            }
        }
        since = Instant::now();
        set_pid(Some(running.pid()));
        if let Some(ack) = restart_ack {
            let _ = ack.send(());
        }
    }
}

/// Sleeps `wait` before the next start. A stop asked for meanwhile is honoured at once
/// (`false`: the supervisor ends); a restart asked for ends the wait and is acknowledged once
/// frpc runs again.
async fn back_off(
    wait: Duration,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    restart_ack: &mut Option<oneshot::Sender<()>>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        cmd = rx.recv() => match cmd {
            Some(Command::Stop(ack)) => {
                let _ = ack.send(());
                false
            }
            Some(Command::Restart(ack)) => {
                *restart_ack = Some(ack);
                true
            }
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_good_run() {
        let b = Backoff::PRODUCTION;
        let s = Duration::from_secs;
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let next = b.next_delay(d, s(2));
            seen.push(next.as_secs());
            d = Some(next);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.next_delay(Some(s(60)), s(61)), s(1));
        assert_eq!(b.next_delay(Some(s(60)), s(59)), s(60));
    }
}
