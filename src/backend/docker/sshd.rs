//! SSH into a container: find or install an SSH server through the exec API, start it, and
//! make `/root/.ssh/authorized_keys` exactly the renter's keys. Every value travels as data:
//! argv arrays, the environment, or files in a tar archive; no shell line is ever built.

use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::time::Instant;

use super::engine::{CALL, Engine};
use super::error::DockerError;
use super::tar::{self, Entry};
use crate::guest::keys::parse_public_key_line;
use crate::guest::script::authorized_keys_file;

/// Where images keep their SSH server.
const SSHD_PATHS: &[&str] = &["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"];
/// Package installs fetch from the network: generous.
const INSTALL: Duration = Duration::from_secs(600);
/// A short command (key generation, the server forking into the background).
const SHORT: Duration = Duration::from_secs(60);
/// How much of a command's output is kept (its tail): the last lines explain a failure.
const EXEC_OUTPUT_KEPT: usize = 16 * 1024;

/// What a finished exec left.
#[derive(Debug)]
pub struct Ran {
    pub code: i64,
    /// Stdout and stderr together, trimmed to the last few lines.
    pub output: String,
}

/// Runs `argv` as root in the container and waits for it (within `limit`).
pub async fn exec(
    engine: &Engine,
    name: &str,
    argv: &[&str],
    env: &[&str],
    limit: Duration,
) -> Result<Ran, DockerError> {
    let until = Instant::now() + limit;
    let config = CreateExecOptions {
        cmd: Some(argv.iter().map(|s| s.to_string()).collect()),
        env: Some(env.iter().map(|s| s.to_string()).collect()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        user: Some("root".to_owned()),
        ..Default::default()
    };
    let what = "run a command in the container";
    let created = engine.call(what, CALL, engine.docker.create_exec(name, config)).await?;
    let started = engine.call(what, CALL, engine.docker.start_exec(&created.id, None)).await?;
    let mut text = String::new();
    if let StartExecResults::Attached { mut output, .. } = started {
        // Output ends when the program (and whatever kept its stdout) is done.
        let read = async {
            while let Some(Ok(chunk)) = output.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                // Only the last lines are kept: a command may print without end.
                if text.len() > EXEC_OUTPUT_KEPT * 2 {
                    let cut = text.len() - EXEC_OUTPUT_KEPT;
                    let cut = (cut..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(0);
                    text.drain(..cut);
                }
            }
        };
        if tokio::time::timeout_at(until, read).await.is_err() {
            return Err(DockerError::Timeout {
                what: "finish a command",
                seconds: limit.as_secs(),
            });
        }
    }
    loop {
        let state = engine.call(what, CALL, engine.docker.inspect_exec(&created.id)).await?;
        if state.running != Some(true) {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let output =
                crate::text::printable(&lines[lines.len().saturating_sub(5)..].join(" | "), 1000);
            return Ok(Ran { code: state.exit_code.unwrap_or(-1), output });
        }
        if Instant::now() >= until {
            return Err(DockerError::Timeout {
                what: "finish a command",
                seconds: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `argv` and turns a non-zero exit into an error naming the program.
async fn must(
    engine: &Engine,
    name: &str,
    argv: &[&str],
    env: &[&str],
    limit: Duration,
) -> Result<(), DockerError> {
    let ran = exec(engine, name, argv, env, limit).await?;
    if ran.code == 0 {
        return Ok(());
    }
    Err(DockerError::Exec {
        program: argv.join(" "),
        status: format!("exit status {}", ran.code),
        output: ran.output,
    })
}

/// The SSH server's path, installed first when the image has none (Debian/Ubuntu: apt-get,
/// Alpine: apk).
pub async fn ensure_installed(engine: &Engine, name: &str) -> Result<&'static str, DockerError> {
    if let Some(path) = find_sshd(engine, name).await? {
        return Ok(path);
    }
    if engine.path_exists(name, "/usr/bin/apt-get").await? {
        tracing::info!(container = %name, "no SSH server in the image: installing openssh-server with apt-get");
        let env = ["DEBIAN_FRONTEND=noninteractive"];
        must(engine, name, &["apt-get", "update"], &env, INSTALL).await?;
        let install = ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"];
        must(engine, name, &install, &env, INSTALL).await?;
    } else if engine.path_exists(name, "/sbin/apk").await? {
        tracing::info!(container = %name, "no SSH server in the image: installing openssh-server with apk");
        must(engine, name, &["apk", "add", "--no-cache", "openssh-server"], &[], INSTALL).await?;
    } else {
        return Err(DockerError::NoSshServer);
    }
    find_sshd(engine, name).await?.ok_or(DockerError::NoSshServer)
}

async fn find_sshd(engine: &Engine, name: &str) -> Result<Option<&'static str>, DockerError> {
    for path in SSHD_PATHS {
        if engine.path_exists(name, path).await? {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Starts the SSH server unless one runs already (it does not survive a container restart).
pub async fn ensure_running(engine: &Engine, name: &str, sshd: &str) -> Result<(), DockerError> {
    let running = engine.processes(name).await?;
    if running.iter().any(|cmd| cmd.contains("sshd")) {
        return Ok(());
    }
    // Host keys the image lacks (Alpine ships none) and the privilege-separation directory.
    must(engine, name, &["ssh-keygen", "-A"], &[], SHORT).await?;
    engine.upload(name, tar::archive(&[Entry::Dir { path: "run/sshd", mode: 0o755 }])).await?;
    let argv = [sshd, "-o", "PasswordAuthentication=no", "-o", "PermitRootLogin=prohibit-password"];
    must(engine, name, &argv, &[], SHORT).await?;
    tracing::info!(container = %name, "SSH server started in the container");
    Ok(())
}

/// Makes root's `authorized_keys` exactly `keys` (validated again), 0600 in a 0700 directory.
pub async fn set_keys(engine: &Engine, name: &str, keys: &[String]) -> Result<(), DockerError> {
    let mut valid = Vec::with_capacity(keys.len());
    for line in keys {
        let key = parse_public_key_line(line).map_err(|e| DockerError::Exec {
            program: "authorized_keys".into(),
            status: "refused".into(),
            output: e.to_string(),
        })?;
        valid.push(key);
    }
    let file = authorized_keys_file(None, &valid);
    let archive = tar::archive(&[
        Entry::Dir { path: "root/.ssh", mode: 0o700 },
        Entry::File { path: "root/.ssh/authorized_keys", mode: 0o600, data: file.as_bytes() },
    ]);
    engine.upload(name, archive).await
}
