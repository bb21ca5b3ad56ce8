//! The one error type of guest configuration (client and setup). Every variant names the
//! instance; its message is one sentence that says what to do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::fsutil::FsError;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(
        "instance {instance}: nothing accepts SSH on {addr} yet ({source}); wait for the guest to boot"
    )]
    NotListening { instance: String, addr: SocketAddr, source: std::io::Error },

    #[error(
        "instance {instance}: the SSH handshake on {addr} failed ({source}); the guest's SSH \
         server is not up yet, wait for it"
    )]
    Handshake { instance: String, addr: SocketAddr, source: Box<russh::Error> },

    #[error(
        "instance {instance}: the guest's SSH server offers the host key {offered}, which is \
         neither the known one ({pinned}) nor one its console showed, so the agent does not log \
         in; the VM keeps running. A guest re-keyed on purpose prints its new keys on its serial \
         console (the agent's images do so by themselves), or delete {known_hosts}"
    )]
    HostKeyChanged { instance: String, pinned: String, offered: String, known_hosts: PathBuf },

    #[error(
        "instance {instance}: the guest's SSH server offers the host key {offered}, which its \
         console has not shown yet; waiting for cloud-init to print the keys"
    )]
    HostKeyNotShown { instance: String, offered: String },

    #[error(
        "instance {instance}: the pinned host key file {path} is unreadable ({reason}); delete it \
         to pin the guest's key again"
    )]
    PinCorrupt { instance: String, path: PathBuf, reason: String },

    #[error("instance {instance}: cannot use the pinned host key file: {source}")]
    KnownHosts { instance: String, source: FsError },

    #[error(
        "instance {instance}: the guest refused the management key for user {user}; check that \
         the seed installed it (guest console log)"
    )]
    AuthRejected { instance: String, user: String },

    #[error(
        "instance {instance}: {action} got no answer within {} ms; the guest is hung or not an \
         SSH server, check its console log",
        after.as_millis()
    )]
    Timeout { instance: String, action: &'static str, after: Duration },

    #[error(
        "instance {instance}: the SSH session failed ({source}); retry once the guest is reachable"
    )]
    Session { instance: String, source: Box<russh::Error> },

    #[error(
        "instance {instance}: SSH was not reachable within {} s (last error: {last})",
        waited.as_secs()
    )]
    Unreachable { instance: String, waited: Duration, last: Box<GuestError> },

    #[error(
        "instance {instance}: the agent closed its SSH session to the guest (the VM stopped or \
         boots again); retry once the instance is running"
    )]
    SessionClosed { instance: String },

    #[error("instance {instance}: `{action}` failed in the guest ({status}): {stderr}")]
    CommandFailed { instance: String, action: String, status: String, stderr: String },

    #[error("{value:?} is not usable in the guest ({reason}); fix the agent's guest settings")]
    BadValue { value: String, reason: &'static str },
}

impl GuestError {
    /// Errors that retrying cannot fix: `wait_reachable` and `GuestSession::get` stop on
    /// them at once.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            GuestError::HostKeyChanged { .. }
                | GuestError::PinCorrupt { .. }
                | GuestError::KnownHosts { .. }
                | GuestError::BadValue { .. }
                | GuestError::SessionClosed { .. }
        )
    }
}
