//! A QMP client: commands typed with `qapi-qmp`, our own line-JSON reader.
//!
//! Not the `qapi` crate's stream wrapper: it drops the connection on the first event its
//! schema does not know, which happens with any QEMU newer than the schema. Here the reader
//! is a plain loop over JSON lines: replies go to the caller waiting on their `id`, events go
//! to a broadcast channel, and anything unknown is logged and skipped. Every call has a
//! timeout; once the connection is lost every pending and later call fails with
//! [`QmpError::Disconnected`].

mod commands;
mod event;
pub mod socket;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qapi_qmp::QmpCommand;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};

pub use event::QmpEvent;

/// A QMP message longer than this is refused (QEMU's replies to our commands are tiny).
const MAX_LINE: u64 = 1 << 20;

/// Events kept for a slow subscriber before it starts missing them.
const EVENT_BUFFER: usize = 64;

/// A QMP call failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum QmpError {
    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command { command: &'static str, class: String, desc: String },
    /// The socket could not be opened.
    #[error("cannot connect to the QMP socket {path}: {detail}; check that the VM's QEMU runs")]
    Connect {
        path: PathBuf,
        detail: String,
        /// Nothing listens on the socket (yet: QEMU binds before it listens).
        refused: bool,
    },
    /// A reply did not have the shape the schema gives the command.
    #[error("QEMU's reply to {command} is not understood: {detail}")]
    Decode { command: &'static str, detail: String },
    /// The connection is gone (QEMU exited or closed it).
    #[error("the QMP connection is closed ({reason}); the VM's QEMU has probably exited")]
    Disconnected { reason: String },
    /// QEMU did not greet as a QMP server does.
    #[error("no QMP greeting on the socket: {detail}; check that it is a QMP socket")]
    Greeting { detail: String },
    /// No reply within the call's timeout.
    #[error("QEMU did not answer {command} within {millis} ms")]
    Timeout { command: &'static str, millis: u128 },
}

/// Commands waiting for their reply, and why the connection closed once it has.
#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Value>>,
    closed: Option<String>,
}

/// What the reader task and the callers share.
struct Inner {
    state: Mutex<State>,
    /// Flips to `true` once, when the connection is lost.
    closed: watch::Sender<bool>,
}

type Shared = Arc<Inner>;

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock leaves the map consistent; keep going.
    inner.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks the connection closed and fails every pending call (their senders are dropped).
fn close(inner: &Inner, reason: String) {
    {
        let mut s = lock(inner);
        s.closed.get_or_insert(reason);
        s.pending.clear();
    }
    inner.closed.send_replace(true);
}

/// Removes a call's pending entry however the call ends (reply, timeout, cancellation).
struct PendingGuard<'a> {
    state: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.state).pending.remove(&self.id);
    }
}

/// One QMP connection, past capabilities negotiation. Share it with `Arc`; calls may run
/// concurrently. Dropping it stops the reader; QEMU keeps running.
pub struct Qmp {
    state: Shared,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    timeout: Duration,
    reader: JoinHandle<()>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket and negotiates capabilities. `call_timeout` bounds the
    /// connection, the greeting and every later call.
    pub async fn connect(path: &Path, call_timeout: Duration) -> Result<Qmp, QmpError> {
        let connect_err = |detail: String, refused: bool| QmpError::Connect {
            path: path.to_owned(),
            detail,
            refused,
        };
        // The socket sits in QEMU's run dir: a link there (put by an escaped QEMU) could lead
        // to another VM's monitor.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(connect_err("it is a link, not QEMU's socket".into(), false));
        }
        let stream = timeout(call_timeout, UnixStream::connect(path))
            .await
            .map_err(|_| {
                connect_err(format!("no answer within {} ms", call_timeout.as_millis()), false)
            })?
            .map_err(|e| {
                let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
                connect_err(e.to_string(), refused)
            })?;
        Qmp::handshake(stream, call_timeout).await
    }

    /// Reads the greeting on an open stream, starts the reader and sends `qmp_capabilities`.
    pub async fn handshake(stream: UnixStream, call_timeout: Duration) -> Result<Qmp, QmpError> {
        let (read, writer) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = match timeout(call_timeout, read_line(&mut reader)).await {
            Err(_) => Err(format!("none within {} ms", call_timeout.as_millis())),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Err("the peer closed the connection".to_owned()),
            Ok(Ok(Some(line))) => Ok(line),
        }
        .map_err(|detail| QmpError::Greeting { detail })?;
        let greeting: Value = serde_json::from_slice(&greeting).unwrap_or(Value::Null);
        if greeting.get("QMP").is_none() {
            let detail = format!("unexpected first message {greeting}");
            return Err(QmpError::Greeting { detail });
        }
        let state = Arc::new(Inner { state: Mutex::default(), closed: watch::Sender::new(false) });
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let reader = tokio::spawn(read_loop(reader, state.clone(), events.clone()));
        let qmp = Qmp {
            state,
            writer: tokio::sync::Mutex::new(writer),
            next_id: AtomicU64::new(1),
            events,
            timeout: call_timeout,
            reader,
        };
        qmp.execute(qapi_qmp::qmp_capabilities { enable: None }).await?;
        Ok(qmp)
    }

    /// Events from now on. QEMU sends none before capabilities negotiation, so subscribing
    /// right after [`Qmp::connect`] misses only what happens in between.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Whether the connection is lost.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed.is_some()
    }

    /// Resolves once the connection is lost (QEMU exited or closed the socket).
    pub async fn closed(&self) {
        let mut closed = self.state.closed.subscribe();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Runs `command` with the connection's call timeout.
    pub async fn execute<C: QmpCommand>(&self, command: C) -> Result<C::Ok, QmpError> {
        self.execute_within(command, self.timeout).await
    }

    /// Runs `command`, failing with [`QmpError::Timeout`] when no reply comes in `limit`.
    pub async fn execute_within<C: QmpCommand>(
        &self,
        command: C,
        limit: Duration,
    ) -> Result<C::Ok, QmpError> {
        let name = C::NAME;
        let deadline = Instant::now() + limit;
        let too_late = || QmpError::Timeout { command: name, millis: limit.as_millis() };
        let arguments = serde_json::to_value(&command)
            .map_err(|e| QmpError::Decode { command: name, detail: e.to_string() })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = serde_json::json!({ "execute": name, "arguments": arguments, "id": id });
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut s = lock(&self.state);
            if let Some(reason) = &s.closed {
                return Err(QmpError::Disconnected { reason: reason.clone() });
            }
            s.pending.insert(id, tx);
        }
        let _guard = PendingGuard { state: &self.state, id };

        let written = timeout_at(deadline, async {
            let mut writer = self.writer.lock().await;
            writer.write_all(&line).await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            // A half-written line leaves the stream unusable.
            Err(_) => {
                close(&self.state, format!("writing {name} timed out"));
                return Err(too_late());
            }
            Ok(Err(e)) => {
                close(&self.state, format!("write failed: {e}"));
                return Err(self.disconnected());
            }
        }
        match timeout_at(deadline, rx).await {
            Err(_) => Err(too_late()),
            Ok(Err(_)) => Err(self.disconnected()),
            Ok(Ok(reply)) => decode::<C>(reply),
        }
    }

    fn disconnected(&self) -> QmpError {
        let reason = lock(&self.state).closed.clone().unwrap_or_else(|| "unknown".to_owned());
        QmpError::Disconnected { reason }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A reply (`{"return": …}` or `{"error": {"class", "desc"}}`) as the command's result type.
fn decode<C: QmpCommand>(reply: Value) -> Result<C::Ok, QmpError> {
    let command = C::NAME;
    if let Some(error) = reply.get("error") {
        let field = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
        return Err(QmpError::Command { command, class: field("class"), desc: field("desc") });
    }
    let value = reply.get("return").cloned().unwrap_or(Value::Null);
    serde_json::from_value(value).map_err(|e| QmpError::Decode { command, detail: e.to_string() })
}

/// One line, without its end; `None` at end of stream.
async fn read_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
        return Err(format!("a message is longer than {MAX_LINE} bytes"));
    }
    Ok(Some(line))
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    state: Shared,
    events: broadcast::Sender<QmpEvent>,
) {
    let reason = loop {
        match read_line(&mut reader).await {
            Ok(Some(line)) => dispatch(&line, &state, &events),
            Ok(None) => break "QEMU closed the connection".to_owned(),
            Err(e) => break e,
        }
    };
    tracing::debug!(%reason, "QMP connection closed");
    close(&state, reason);
}

fn dispatch(line: &[u8], state: &Shared, events: &broadcast::Sender<QmpEvent>) {
    let message = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(message)) => message,
        _ => {
            let text = String::from_utf8_lossy(line);
            tracing::warn!(line = %text.trim(), "ignoring a QMP message that is not a JSON object");
            return;
        }
    };
    if let Some(name) = message.get("event").and_then(Value::as_str) {
        let event = QmpEvent::from_message(name, message.get("data"));
        tracing::debug!(?event, "QMP event");
        // No subscriber is fine: nobody is interested right now.
        let _ = events.send(event);
    } else if message.contains_key("return") || message.contains_key("error") {
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::warn!(?message, "ignoring a QMP reply without our id");
            return;
        };
        match lock(state).pending.remove(&id) {
            Some(tx) => drop(tx.send(Value::Object(message))),
            None => tracing::debug!(id, "QMP reply to a call that already gave up"),
        }
    } else {
        tracing::debug!(?message, "ignoring an unknown QMP message");
    }
}

#[cfg(test)]
mod tests;
