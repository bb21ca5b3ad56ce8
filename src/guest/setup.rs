//! Guest-side actions built on the client: the renter's `authorized_keys` and the renter's
//! `command` as a background service. Works on a busybox guest (no systemd).

use std::collections::BTreeMap;

use super::client::{GuestClient, GuestCommand, GuestPath};
use super::error::GuestError;
use super::keys::parse_public_key_line;
use super::script::{self, ServiceVerb};

/// Where things live in the guest. Tests point these into a temp dir so they never touch the
/// real `/root/.ssh`.
#[derive(Clone, Debug)]
pub struct GuestPaths {
    /// The file the guest's SSH server reads the renter's (and the agent's) keys from.
    pub authorized_keys: GuestPath,
    /// Private directory (0700) for the service's scripts, environment, pid and log.
    pub run_dir: GuestPath,
    /// Where the users' homes are; the image's default user is the one whose
    /// `authorized_keys` cloud-init gave the management key.
    pub homes: GuestPath,
    /// The agent's lasting state on the guest's disk (the default user's home).
    pub state_dir: GuestPath,
}

impl Default for GuestPaths {
    fn default() -> Self {
        GuestPaths {
            authorized_keys: GuestPath::new("/root/.ssh/authorized_keys").expect("valid path"),
            run_dir: GuestPath::new("/run/qudata").expect("valid path"),
            homes: GuestPath::new("/home").expect("valid path"),
            state_dir: GuestPath::new("/var/lib/qudata-guest").expect("valid path"),
        }
    }
}

/// Makes `authorized_keys` hold exactly the management key (when given, always first, so the
/// agent keeps its access) and `renter_keys`. The keys are validated again and travel as
/// stdin data; the file is 0600 in a 0700 directory.
pub async fn set_authorized_keys(
    client: &GuestClient,
    paths: &GuestPaths,
    management_line: Option<&str>,
    renter_keys: &[String],
) -> Result<(), GuestError> {
    let mut keys = Vec::with_capacity(renter_keys.len());
    for line in renter_keys {
        keys.push(parse_public_key_line(line).map_err(|e| GuestError::BadValue {
            value: line.clone(),
            reason: match e {
                super::KeyError::BadPublicKey { reason } => reason,
                _ => "not an OpenSSH public key line",
            },
        })?);
    }
    let file = &paths.authorized_keys;
    let dir = match file.as_str().rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => GuestPath::new(dir)?,
        _ => {
            return Err(GuestError::BadValue {
                value: file.as_str().into(),
                reason: "no parent directory",
            });
        }
    };
    let mkdir = GuestCommand::built(script::mkdir_command(&dir));
    client.run("create the SSH key directory", &mkdir, b"").await?;
    let contents = script::authorized_keys_file(management_line, &keys);
    client.upload(file, contents.as_bytes(), 0o600).await?;
    let users = match management_line {
        Some(line) => set_default_user_keys(client, paths, line, &keys).await?,
        None => Vec::new(),
    };
    tracing::info!(
        instance = %client.target().instance,
        keys = keys.len(),
        default_users = ?users,
        "renter SSH keys applied"
    );
    Ok(())
}

/// The renter's keys for the image's default user too (see [`script::USERS_SCRIPT_TEXT`]);
/// returns the homes it wrote. A guest without such a user (the CI guest) has none.
async fn set_default_user_keys(
    client: &GuestClient,
    paths: &GuestPaths,
    management_line: &str,
    keys: &[String],
) -> Result<Vec<String>, GuestError> {
    let dir = &paths.run_dir;
    client
        .run("create the service directory", &GuestCommand::built(script::mkdir_command(dir)), b"")
        .await?;
    let renter = script::authorized_keys_file(None, keys);
    client.upload(&dir.join(script::RENTER_KEYS_FILE), renter.as_bytes(), 0o600).await?;
    let management = format!("{}\n", management_line.trim());
    client.upload(&dir.join(script::MANAGEMENT_KEY_FILE), management.as_bytes(), 0o600).await?;
    let script_path = dir.join(script::USERS_SCRIPT);
    client.upload(&script_path, script::USERS_SCRIPT_TEXT.as_bytes(), 0o700).await?;
    let run = GuestCommand::built(format!(
        "sh {} {} {}",
        script::sh_quote(script_path.as_str()),
        script::sh_quote(paths.homes.as_str()),
        script::sh_quote(paths.state_dir.as_str())
    ));
    let out = client.run("give the default user the renter's keys", &run, b"").await?;
    let users = String::from_utf8_lossy(&out.stdout);
    Ok(users.lines().map(|u| crate::text::printable(u, 64)).take(16).collect())
}

/// The command the agent runs when it starts JupyterLab itself (its token comes in the
/// environment, `JUPYTER_TOKEN`, never on a command line the guest's `ps` shows).
pub const JUPYTER_COMMAND: &str = "jupyter lab --ip=0.0.0.0 --port=8888 --no-browser --allow-root";

/// Starts the renter's `command` with `env` as a background service in the guest's
/// `$HOME`, in a session of its own (it outlives the SSH connection). One already running
/// with the same command and environment is kept (an agent that restarted and adopted the VM);
/// a different one is replaced. Returns its pid.
///
/// The command line and the values are written to files in `run_dir` and read by the fixed
/// scripts there; the command runs as `sh -c "$command"` inside the renter's own VM.
pub async fn start_service(
    client: &GuestClient,
    paths: &GuestPaths,
    command: &str,
    env: &BTreeMap<String, String>,
) -> Result<u32, GuestError> {
    let env_text = script::env_file(env).map_err(|name| GuestError::BadValue {
        value: name,
        reason: "an environment variable name must match [A-Za-z_][A-Za-z0-9_]*",
    })?;
    let dir = &paths.run_dir;
    client
        .run("create the service directory", &GuestCommand::built(script::mkdir_command(dir)), b"")
        .await?;
    client.upload(&dir.join(script::RUN_SCRIPT), script::RUN_SCRIPT_TEXT.as_bytes(), 0o700).await?;
    client
        .upload(&dir.join(script::SERVICE_SCRIPT), script::SERVICE_SCRIPT_TEXT.as_bytes(), 0o700)
        .await?;
    client.upload(&dir.join(script::NEW_ENV_FILE), env_text.as_bytes(), 0o600).await?;
    client.upload(&dir.join(script::NEW_COMMAND_FILE), command.as_bytes(), 0o600).await?;
    let start = GuestCommand::built(script::service_command(dir, ServiceVerb::Ensure));
    let out = client.run("start the renter's command", &start, b"").await?;
    let pid = parse_pid(&out.stdout).ok_or_else(|| GuestError::CommandFailed {
        instance: client.target().instance.clone(),
        action: "start the renter's command".into(),
        status: "no pid printed".into(),
        stderr: crate::text::printable(String::from_utf8_lossy(&out.stderr).trim(), 500),
    })?;
    tracing::info!(instance = %client.target().instance, pid, "renter command started");
    Ok(pid)
}

/// Stops the renter's service (TERM to its process group, KILL after 10 s). Idempotent.
pub async fn stop_service(client: &GuestClient, paths: &GuestPaths) -> Result<(), GuestError> {
    if !service_installed(client, paths).await? {
        return Ok(());
    }
    let stop = GuestCommand::built(script::service_command(&paths.run_dir, ServiceVerb::Stop));
    client.run("stop the renter's command", &stop, b"").await.map(drop)
}

/// The service's pid when it is running.
pub async fn service_pid(
    client: &GuestClient,
    paths: &GuestPaths,
) -> Result<Option<u32>, GuestError> {
    if !service_installed(client, paths).await? {
        return Ok(None);
    }
    let status = GuestCommand::built(script::service_command(&paths.run_dir, ServiceVerb::Status));
    let out = client.exec(&status, b"").await?;
    Ok(if out.success() { parse_pid(&out.stdout) } else { None })
}

async fn service_installed(client: &GuestClient, paths: &GuestPaths) -> Result<bool, GuestError> {
    let script = paths.run_dir.join(script::SERVICE_SCRIPT);
    let test = GuestCommand::built(format!("test -f {}", script::sh_quote(script.as_str())));
    Ok(client.exec(&test, b"").await?.success())
}

fn parse_pid(stdout: &[u8]) -> Option<u32> {
    std::str::from_utf8(stdout).ok()?.trim().parse().ok().filter(|&p| p > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_parsed_strictly() {
        assert_eq!(parse_pid(b"1234\n"), Some(1234));
        assert_eq!(parse_pid(b"1"), None);
        assert_eq!(parse_pid(b""), None);
        assert_eq!(parse_pid(b"12 34"), None);
    }

    #[test]
    fn default_paths_are_the_real_guest_ones() {
        let p = GuestPaths::default();
        assert_eq!(p.authorized_keys.as_str(), "/root/.ssh/authorized_keys");
        assert_eq!(p.run_dir.as_str(), "/run/qudata");
    }
}
