//! One guest's GPU metrics stream: a single SSH channel running `nvidia-smi … -lms <ms>` on
//! the guest's shared session, read line by line into the board, for as long as the instance
//! runs. A broken channel is opened again with back-off (the session makes the connection
//! again with the same policy); no process is spawned per sample, in the guest or here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use tokio::sync::watch;
use tokio::time::Instant;

use super::board::GuestGpuBoard;
use super::parse::{QUERY, parse_line};
use crate::guest::session::RECONNECT;
use crate::guest::{GuestCommand, GuestError, GuestSession};

/// Opening the channel and starting the command on a live connection.
const OPEN_DEADLINE: Duration = Duration::from_secs(20);
/// A line is overdue after this many intervals: the channel is stuck, open a new one.
const IDLE_INTERVALS: u32 = 20;
/// Longer lines are not nvidia-smi's; they are dropped, so a runaway guest cannot grow memory.
const MAX_LINE: usize = 4096;
/// The shell's "command not found" exit status.
const NOT_FOUND: u32 = 127;

/// The command the stream runs: fixed text and the agent's own interval, nothing else.
pub fn stream_command(interval: Duration) -> GuestCommand {
    let ms = interval.as_millis().clamp(100, 60_000);
    GuestCommand::built(format!(
        "exec nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits -lms {ms}"
    ))
}

/// What the stream of one instance needs.
#[derive(Clone)]
pub struct StreamSpec {
    /// The guest's session, shared with configuration.
    pub session: Arc<GuestSession>,
    /// The instance has GPUs: a guest without `nvidia-smi` (driver not installed yet) is
    /// retried; without GPUs it ends the stream quietly.
    pub has_gpus: bool,
    pub interval: Duration,
}

/// How one session ended.
#[derive(Debug)]
enum Ended {
    /// The guest has no `nvidia-smi`.
    NotFound,
    /// The command or channel ended after `lines` good lines.
    Closed {
        lines: u64,
        status: Option<u32>,
        stderr: String,
    },
    /// No line within the idle deadline.
    Idle {
        lines: u64,
    },
    Failed(GuestError),
    Stopped,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::NotFound => f.write_str("the guest has no nvidia-smi"),
            Ended::Closed { lines, status, stderr } => {
                let status = status.map_or("no exit status".into(), |s| format!("exit status {s}"));
                write!(f, "nvidia-smi ended ({status}) after {lines} lines: {stderr}")
            }
            Ended::Idle { lines } => write!(f, "no line for too long (after {lines} lines)"),
            Ended::Failed(e) => write!(f, "{e}"),
            Ended::Stopped => f.write_str("stopped"),
        }
    }
}

/// Runs until `stop` turns true or `gone` resolves (the VM exited); the board holds no value
/// of this instance afterwards.
pub async fn run(
    spec: StreamSpec,
    board: GuestGpuBoard,
    mut stop: watch::Receiver<bool>,
    gone: Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let id = spec.session.target().instance.clone();
    let session = async {
        let mut attempt = 0u32;
        loop {
            let ended = session(&spec, &board, &mut stop).await;
            board.clear(&id);
            match ended {
                Ended::Stopped => return,
                Ended::NotFound if !spec.has_gpus => {
                    tracing::info!(%id, "the guest has no nvidia-smi and the instance no GPU: no in-guest GPU metrics");
                    return;
                }
                Ended::Closed { lines, .. } | Ended::Idle { lines } if lines > 0 => attempt = 0,
                _ => {}
            }
            let loud = attempt == 0 || attempt.is_multiple_of(20);
            if loud {
                tracing::warn!(%id, reason = %ended, "in-guest GPU metrics stream ended; opening it again");
            } else {
                tracing::debug!(%id, reason = %ended, attempt, "in-guest GPU metrics stream retry");
            }
            // The session's back-off: its own wait for a broken connection overlaps this one
            // instead of adding to it.
            let pause = RECONNECT.delay(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    };
    tokio::select! {
        _ = session => {}
        _ = gone => tracing::debug!(%id, "VM gone: GPU metrics stream ends"),
    }
    board.clear(&id);
}

/// One channel on the guest's session, read until it ends.
async fn session(
    spec: &StreamSpec,
    board: &GuestGpuBoard,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let client = tokio::select! {
        c = spec.session.get() => match c {
            Ok(c) => c,
            // The VM stopped or boots again: whoever starts it configures it anew.
            Err(GuestError::SessionClosed { .. }) => return Ended::Stopped,
            Err(e) => return Ended::Failed(e),
        },
        _ = stop.wait_for(|s| *s) => return Ended::Stopped,
    };
    let command = stream_command(spec.interval);
    let mut channel = match client.open_stream(&command, Instant::now() + OPEN_DEADLINE).await {
        Ok(channel) => channel,
        Err(e) => return Ended::Failed(e),
    };
    let ended = read(&mut channel, spec, board, stop).await;
    // Ends nvidia-smi in the guest (its pipes close); the connection stays for the others.
    let _ = channel.close().await;
    ended
}

async fn read(
    channel: &mut russh::Channel<russh::client::Msg>,
    spec: &StreamSpec,
    board: &GuestGpuBoard,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let id = &spec.session.target().instance;
    let idle = spec.interval * IDLE_INTERVALS;
    let (mut pending, mut stderr) = (Vec::<u8>::new(), Vec::<u8>::new());
    let (mut lines, mut status) = (0u64, None);
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(idle, channel.wait()) => match m {
                Ok(m) => m,
                Err(_) => return Ended::Idle { lines },
            },
            _ = stop.wait_for(|s| *s) => return Ended::Stopped,
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    match parse_line(&String::from_utf8_lossy(&line)) {
                        Ok(gpu) => {
                            lines += 1;
                            board.record(id, gpu.stats());
                        }
                        Err(e) => {
                            let error = crate::text::printable(&e.to_string(), 300);
                            tracing::debug!(%id, %error, "not a GPU line")
                        }
                    }
                }
                if pending.len() > MAX_LINE {
                    pending.clear();
                }
            }
            Some(ChannelMsg::ExtendedData { data, .. }) if stderr.len() < MAX_LINE => {
                stderr.extend_from_slice(&data)
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(ChannelMsg::Close | ChannelMsg::Eof) | None if status == Some(NOT_FOUND) => {
                return Ended::NotFound;
            }
            Some(ChannelMsg::Close) | None => {
                let stderr = crate::text::printable(String::from_utf8_lossy(&stderr).trim(), 300);
                return Ended::Closed { lines, status, stderr };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_fixed_text_and_the_interval() {
        assert_eq!(
            stream_command(Duration::from_millis(500)).as_str(),
            "exec nvidia-smi --query-gpu=index,name,utilization.gpu,temperature.gpu,memory.used,\
             memory.total,power.draw --format=csv,noheader,nounits -lms 500"
        );
        assert!(stream_command(Duration::from_millis(5)).as_str().ends_with("-lms 100"));
    }
}
