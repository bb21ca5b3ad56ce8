//! Finding programs on a `PATH` and asking them their version, with a deadline.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::DoctorError;

/// `name` itself when it holds a `/`, else the first executable `dir/name` of `search_path`.
pub fn find_program(name: &Path, search_path: &OsStr) -> Option<PathBuf> {
    if name.as_os_str().is_empty() {
        return None;
    }
    if name.components().count() > 1 || name.is_absolute() {
        return is_executable(name).then(|| name.to_owned());
    }
    std::env::split_paths(search_path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first non-empty line `program --version` prints, killed after `timeout`.
pub fn version_line(program: &Path, timeout: Duration) -> Result<String, DoctorError> {
    let spawn_err = |source| DoctorError::Spawn { program: program.to_owned(), source };
    let mut child = Command::new(program)
        .arg("--version")
        .env_clear()
        .envs(crate::child_env::for_child())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(spawn_err)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                // Reap it: no zombie outlives the check.
                let _ = child.kill();
                let _ = child.wait();
                return Err(DoctorError::Timeout { program: program.to_owned(), timeout });
            }
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err(source));
            }
        }
    };
    if !status.success() {
        return Err(DoctorError::Exit { program: program.to_owned(), status });
    }
    // The program has exited, so its output is complete (a version line fits the pipe).
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    Ok(out.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_owned())
}
