//! QEMU's monitor socket, made by the agent: bound in a directory only root may change and
//! handed to QEMU as an inherited listening descriptor (`-chardev socket,fd=N,server=on`), so
//! QEMU never creates or names the path the agent connects to. A QEMU taken over by its guest
//! runs as an unprivileged user who owns its VM's run dir; a socket there could be swapped for
//! a link to another VM's monitor between the agent's check and its connect.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// A bound, listening monitor socket. QEMU gets the descriptor; the agent drops its own copy
/// once QEMU is spawned, so a QEMU that dies takes the socket's listener with it and a
/// connection waiting for its greeting ends at once.
pub struct MonitorSocket {
    listener: UnixListener,
}

impl MonitorSocket {
    /// Binds `path`; its directory is made root's and private (0700) first. A socket left by
    /// a QEMU that is gone is replaced; anything else at `path` is an error.
    pub fn bind(path: &Path) -> io::Result<MonitorSocket> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let meta = std::fs::symlink_metadata(dir)?;
            if !meta.is_dir() {
                return Err(io::Error::other(format!("{} is not a directory", dir.display())));
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                let what = format!("{} exists and is not a socket", path.display());
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, what));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(MonitorSocket { listener: UnixListener::bind(path)? })
    }

    /// The listening descriptor QEMU inherits (close-on-exec here; cleared in QEMU's child).
    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_in_a_private_dir_and_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp/abc.sock");
        let first = MonitorSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(first); // a QEMU gone: its socket file stays behind
        let again = MonitorSocket::bind(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(again);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a socket").unwrap();
        let err = MonitorSocket::bind(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    }
}
