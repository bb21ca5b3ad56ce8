//! systemd's readiness protocol (sd_notify(3)) for `Type=notify`: one datagram of
//! `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET`. Outside systemd the variable is
//! unset and every call is a no-op.
//!
//! Own code rather than libsystemd: the protocol is one `sendto`, and a failure to notify must
//! never stop the agent (systemd then times the start out and restarts us, which is the right
//! outcome), so errors are logged, not returned.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A notification could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot create a datagram socket: {source}")]
    Socket { source: io::Error },
    #[error("cannot send to the notify socket {socket:?}: {source}")]
    Send { socket: String, source: io::Error },
    #[error("the notify socket {socket:?} took {sent} of {len} bytes")]
    Short { socket: String, sent: usize, len: usize },
}

/// The message telling systemd the API answers on `port`.
pub fn ready_message(port: u16) -> String {
    format!("READY=1\nSTATUS=API listening on 127.0.0.1:{port}\n")
}

/// The message telling systemd a shutdown has begun (so it does not read our exit as a crash
/// in progress, and `systemctl status` says "deactivating").
pub const STOPPING_MESSAGE: &str = "STOPPING=1\nSTATUS=shutting down; instances keep running\n";

/// Sends `message` to `socket`: a path, or an abstract name when it starts with `@`.
pub fn send_to(socket: &OsStr, message: &str) -> Result<(), NotifyError> {
    let shown = || socket.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound().map_err(|source| NotifyError::Socket { source })?;
    let bytes = message.as_bytes();
    let sent = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)
                .map_err(|source| NotifyError::Send { socket: shown(), source })?;
            sock.send_to_addr(bytes, &addr)
        }
        None => sock.send_to(bytes, socket),
    }
    .map_err(|source| NotifyError::Send { socket: shown(), source })?;
    if sent != bytes.len() {
        return Err(NotifyError::Short { socket: shown(), sent, len: bytes.len() });
    }
    Ok(())
}

/// Sends `message` to `$NOTIFY_SOCKET` when it is set; logs a failure and goes on.
fn notify(message: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty()) else {
        return;
    };
    match send_to(&socket, message) {
        Ok(()) => tracing::debug!(message = message.lines().next(), "told systemd"),
        Err(error) => tracing::warn!(%error, "cannot notify systemd"),
    }
}

/// The API listens on `port`: systemd may now order dependent units after us.
pub fn ready(port: u16) {
    notify(&ready_message(port));
}

/// A shutdown has begun.
pub fn stopping() {
    notify(STOPPING_MESSAGE);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_are_newline_terminated_key_value_lines() {
        assert_eq!(ready_message(8734), "READY=1\nSTATUS=API listening on 127.0.0.1:8734\n");
        assert_eq!(STOPPING_MESSAGE, "STOPPING=1\nSTATUS=shutting down; instances keep running\n");
    }

    #[test]
    fn sends_one_datagram_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), &ready_message(1)).unwrap();
        assert_eq!(receive(&server), ready_message(1));
    }

    #[test]
    fn sends_to_an_abstract_socket_named_with_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("qudata-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(OsStr::new(&format!("@{name}")), STOPPING_MESSAGE).unwrap();
        assert_eq!(receive(&server), STOPPING_MESSAGE);
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let err = send_to(path.as_os_str(), "READY=1\n").unwrap_err();
        assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
        assert!(err.to_string().contains("absent"), "{err}");
    }
}
