//! The Docker engine and the agent's data dir.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use super::{Check, HostView, Need, Status};

/// How long a connect to the Docker socket may take (a full backlog blocks it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The Docker socket accepts a connection.
pub fn docker(view: &HostView) -> Check {
    let path = view.docker_socket.clone();
    let missing = view.missing(Need::Docker);
    if !path.exists() {
        let detail = format!("{} does not exist: no Docker backend", path.display());
        return Check::new("docker", missing, detail, "apt-get install docker.io");
    }
    let (tx, rx) = mpsc::channel();
    let target = path.clone();
    // A thread, so the check keeps its deadline even when connect blocks.
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&target).map(drop));
    });
    match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(Ok(())) => Check::ok("docker", format!("{} accepts connections", path.display())),
        Ok(Err(e)) => Check::new(
            "docker",
            missing,
            format!("cannot connect to {}: {e}", path.display()),
            "systemctl start docker",
        ),
        Err(_) => Check::new(
            "docker",
            missing,
            format!("{} did not accept within {CONNECT_TIMEOUT:?}", path.display()),
            "systemctl restart docker",
        ),
    }
}

/// The data dir is a directory owned by root with mode 0700 (it holds the agent's identity).
pub fn data_dir(view: &HostView) -> Check {
    let dir = &view.data_dir;
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let detail = format!("{} does not exist: created at first run", dir.display());
            return Check { check: "datadir", status: Status::Warn, detail, fix: None };
        }
        Err(e) => {
            let detail = format!("cannot stat {}: {e}", dir.display());
            return Check::new("datadir", Status::Fail, detail, "check the parent's permissions");
        }
    };
    if !meta.is_dir() {
        let detail = format!("{} is not a directory", dir.display());
        return Check::new("datadir", Status::Fail, detail, "move it away or set QUDATA_DATA_DIR");
    }
    if meta.uid() != 0 {
        let detail = format!("{} is owned by uid {}, not root", dir.display(), meta.uid());
        return Check::new(
            "datadir",
            Status::Fail,
            detail,
            format!("chown root: {}", dir.display()),
        );
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o700 {
        let detail = format!("{} has mode {mode:04o}, not 0700", dir.display());
        return Check::new(
            "datadir",
            Status::Warn,
            detail,
            format!("chmod 0700 {}", dir.display()),
        );
    }
    Check::ok("datadir", format!("{}, mode 0700, owned by root", dir.display()))
}
