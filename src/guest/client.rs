//! The SSH client the agent configures guests with: connect to the guest's forwarded port on
//! 127.0.0.1, log in with the management key, check the pinned host key, run fixed commands.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::PrivateKeyWithHashAlg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::time::Instant;

pub use super::command::{GuestCommand, GuestPath};
use super::error::GuestError;
use super::hostkey::{HostKeys, PinError, Pinning};
use super::keys::ManagementKey;
use super::script;

/// Output kept per stream; more is dropped (commands the agent runs print little).
const MAX_OUTPUT: usize = 1 << 20;
/// Pause between attempts in [`GuestClient::wait_reachable`].
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Longest single attempt in `wait_reachable`: during early boot QEMU's user network accepts
/// the host side and then waits on a guest that does not answer yet; a fresh attempt is
/// better than waiting on that connection until the overall deadline.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(15);

/// Where and how to reach one instance's guest.
#[derive(Clone, Debug)]
pub struct GuestTarget {
    /// The instance id, named in every error and log line.
    pub instance: String,
    /// The host end of the guest's SSH port forward.
    pub addr: SocketAddr,
    pub user: String,
    /// This instance's host keys: where they are kept and the console they are learned from.
    pub host_keys: HostKeys,
    /// Limit for one [`GuestClient::exec`].
    pub exec_timeout: Duration,
}

impl GuestTarget {
    /// `root@127.0.0.1:<port>`, 60 s per command.
    /// With no console to learn host keys from: the first key is trusted (a test sshd).
    pub fn new(instance: impl Into<String>, port: u16, known_hosts: PathBuf) -> Self {
        GuestTarget {
            instance: instance.into(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            user: "root".into(),
            host_keys: HostKeys::new(known_hosts, None),
            exec_timeout: Duration::from_secs(60),
        }
    }
}

/// What a command left behind. `status` is `None` when the guest sent no exit status (the
/// command was killed by a signal, named in `signal`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub status: Option<u32>,
    pub signal: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// `exit status 1` / `signal KILL`, for error messages.
    pub fn describe_status(&self) -> String {
        match (&self.status, &self.signal) {
            (Some(s), _) => format!("exit status {s}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no exit status".into(),
        }
    }
}

/// An authenticated SSH connection to one guest. Commands may run concurrently on it, each
/// on a channel of its own; [`GuestSession`](super::session::GuestSession) shares one per guest.
pub struct GuestClient {
    target: GuestTarget,
    handle: Handle<Pinning>,
}

impl GuestClient {
    /// One attempt: TCP connect, handshake with host-key pinning, public-key login, all before
    /// `deadline`.
    pub async fn connect(
        target: &GuestTarget,
        key: &ManagementKey,
        deadline: Instant,
    ) -> Result<Self, GuestError> {
        let started = Instant::now();
        let timeout = || GuestError::Timeout {
            instance: target.instance.clone(),
            action: "the SSH connection",
            after: deadline.saturating_duration_since(started),
        };
        tokio::time::timeout_at(deadline, Self::connect_inner(target, key))
            .await
            .map_err(|_| timeout())?
    }

    async fn connect_inner(target: &GuestTarget, key: &ManagementKey) -> Result<Self, GuestError> {
        let instance = || target.instance.clone();
        let stream = tokio::net::TcpStream::connect(target.addr).await.map_err(|source| {
            GuestError::NotListening { instance: instance(), addr: target.addr, source }
        })?;
        let _ = stream.set_nodelay(true);
        let config = Arc::new(client::Config {
            // A guest that stops answering is noticed by long-lived channels (metrics).
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            ..Default::default()
        });
        let pinning = Pinning { keys: target.host_keys.clone() };
        let mut handle =
            client::connect_stream(config, stream, pinning).await.map_err(|e| match e {
                PinError::Changed { pinned, offered } => GuestError::HostKeyChanged {
                    instance: instance(),
                    pinned,
                    offered,
                    known_hosts: target.host_keys.file.clone(),
                },
                PinError::NotYet { offered } => {
                    GuestError::HostKeyNotShown { instance: instance(), offered }
                }
                PinError::Corrupt { path, reason } => {
                    GuestError::PinCorrupt { instance: instance(), path, reason }
                }
                PinError::Fs(source) => GuestError::KnownHosts { instance: instance(), source },
                PinError::Ssh(source) => GuestError::Handshake {
                    instance: instance(),
                    addr: target.addr,
                    source: Box::new(source),
                },
            })?;
        let auth = PrivateKeyWithHashAlg::new(key.private(), None);
        let result =
            handle.authenticate_publickey(target.user.clone(), auth).await.map_err(|source| {
                GuestError::Session { instance: instance(), source: Box::new(source) }
            })?;
        if !result.success() {
            return Err(GuestError::AuthRejected {
                instance: instance(),
                user: target.user.clone(),
            });
        }
        tracing::debug!(instance = %target.instance, addr = %target.addr, "SSH session open");
        Ok(GuestClient { target: target.clone(), handle })
    }

    /// Retries [`connect`](Self::connect) until it works or `deadline` passes. A guest still
    /// booting (refused, reset, no banner, key not yet installed) is retried; a changed host
    /// key or an unusable pin file stops at once.
    pub async fn wait_reachable(
        target: &GuestTarget,
        key: &ManagementKey,
        deadline: Instant,
    ) -> Result<Self, GuestError> {
        let started = Instant::now();
        loop {
            let attempt = deadline.min(Instant::now() + ATTEMPT_LIMIT);
            let last = match Self::connect(target, key, attempt).await {
                Ok(client) => return Ok(client),
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => e,
            };
            tracing::debug!(instance = %target.instance, error = %last, "guest not reachable yet");
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(GuestError::Unreachable {
                    instance: target.instance.clone(),
                    waited: started.elapsed(),
                    last: Box::new(last),
                });
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    pub fn target(&self) -> &GuestTarget {
        &self.target
    }

    /// Runs `command`, feeds it `stdin` then end-of-file, and collects its output, within the
    /// target's `exec_timeout`. A non-zero exit status is not an error here; see `run`.
    /// On timeout the command is sent SIGKILL and the channel is closed; a server that ignores
    /// signal requests (OpenSSH does for root sessions) leaves the command running, so the
    /// agent's commands must be short and bounded themselves.
    pub async fn exec(&self, command: &GuestCommand, stdin: &[u8]) -> Result<Output, GuestError> {
        let after = self.target.exec_timeout;
        let deadline = Instant::now() + after;
        let timeout = || GuestError::Timeout {
            instance: self.target.instance.clone(),
            action: "a guest command",
            after,
        };
        let session = |source| GuestError::Session {
            instance: self.target.instance.clone(),
            source: Box::new(source),
        };
        let channel = tokio::time::timeout_at(deadline, async {
            let channel = self.handle.channel_open_session().await?;
            channel.exec(true, command.as_str()).await?;
            Ok(channel)
        })
        .await
        .map_err(|_| timeout())?
        .map_err(session)?;
        let (reader, writer) = channel.split();
        match tokio::time::timeout_at(deadline, talk(reader, &writer, stdin)).await {
            Ok((Err(source), out)) if out.success() && !stdin.is_empty() => Err(session(source)),
            Ok((_, out)) => Ok(out),
            Err(_) => {
                let _ = writer.signal(russh::Sig::KILL).await;
                let _ = writer.close().await;
                Err(timeout())
            }
        }
    }

    /// Starts `command` on a channel of its own for a long-lived stream (in-guest metrics) and
    /// hands the channel over: the caller reads it, with its own idle deadline, and ends the
    /// command by dropping the channel (the guest's SSH server then closes its pipes).
    pub async fn open_stream(
        &self,
        command: &GuestCommand,
        deadline: Instant,
    ) -> Result<russh::Channel<client::Msg>, GuestError> {
        let started = Instant::now();
        let opened = tokio::time::timeout_at(deadline, async {
            let channel = self.handle.channel_open_session().await?;
            channel.exec(true, command.as_str()).await?;
            Ok(channel)
        })
        .await
        .map_err(|_| GuestError::Timeout {
            instance: self.target.instance.clone(),
            action: "opening a stream",
            after: deadline.saturating_duration_since(started),
        })?;
        opened.map_err(|source| GuestError::Session {
            instance: self.target.instance.clone(),
            source: Box::new(source),
        })
    }

    /// [`exec`](Self::exec), with a non-zero exit turned into `CommandFailed` naming `action`.
    pub async fn run(
        &self,
        action: &str,
        command: &GuestCommand,
        stdin: &[u8],
    ) -> Result<Output, GuestError> {
        let out = self.exec(command, stdin).await?;
        if out.success() {
            return Ok(out);
        }
        Err(GuestError::CommandFailed {
            instance: self.target.instance.clone(),
            action: action.to_owned(),
            status: out.describe_status(),
            stderr: crate::text::printable(String::from_utf8_lossy(&out.stderr).trim(), 500),
        })
    }

    /// Writes `bytes` to `path` in the guest with `mode`, atomically (temp file + rename).
    /// The content travels as stdin data; only the agent's own path is in the command.
    pub async fn upload(
        &self,
        path: &GuestPath,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), GuestError> {
        let command = GuestCommand::built(script::upload_command(path, mode));
        self.run(&format!("write {}", path.as_str()), &command, bytes).await.map(drop)
    }

    /// The connection ended (the guest went, keepalives went unanswered, or it was closed).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Says goodbye to the guest (best effort); channels still open on it end.
    pub async fn close(&self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}

/// Feeds stdin while reading output, so neither side can stall the other. A command that
/// exits without reading all of stdin closes the channel under the feeder; the caller decides
/// whether that matters.
async fn talk(
    mut reader: ChannelReadHalf,
    writer: &ChannelWriteHalf<client::Msg>,
    stdin: &[u8],
) -> (Result<(), russh::Error>, Output) {
    let feed = async {
        let sent = if stdin.is_empty() { Ok(()) } else { writer.data(stdin).await };
        sent.and(writer.eof().await)
    };
    let collect = async {
        let mut out = Output::default();
        while let Some(msg) = reader.wait().await {
            match msg {
                ChannelMsg::Data { data } => append(&mut out.stdout, &data),
                ChannelMsg::ExtendedData { data, ext: 1 } => append(&mut out.stderr, &data),
                ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.signal = Some(format!("{signal_name:?}"))
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        out
    };
    tokio::join!(feed, collect)
}

fn append(buf: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_is_described() {
        let mut out = Output { status: Some(0), ..Default::default() };
        assert!(out.success());
        out.status = Some(2);
        assert_eq!(out.describe_status(), "exit status 2");
        out.status = None;
        out.signal = Some("KILL".into());
        assert!(!out.success());
        assert_eq!(out.describe_status(), "signal KILL");
    }
}
