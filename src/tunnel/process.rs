//! frpc as an OS process: spawned in its own process group (so it outlives an agent restart),
//! recorded in a pidfile, found again only when `/proc/<pid>/cmdline` is frpc with our config.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Where the supervisor keeps its pidfile and frpc's output.
pub fn pidfile(run_dir: &Path) -> PathBuf {
    run_dir.join("frpc.pid")
}

/// frpc's stdout and stderr: a file rather than a pipe, because a Go program dies on a write
/// to a closed pipe, and the pipe's reader (the agent) may restart while frpc runs on.
pub fn log_file(run_dir: &Path) -> PathBuf {
    run_dir.join("frpc.log")
}

/// argv of frpc (after the program itself).
pub fn frpc_args(config: &Path) -> Vec<std::ffi::OsString> {
    vec!["-c".into(), config.as_os_str().to_owned()]
}

/// The environment frpc gets: not the agent's (which may hold its API key), only what every
/// child gets and what frpc reads (`http_proxy` is its default for `transport.proxyURL`).
pub fn frpc_env(
    agent_env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    const ALSO: &[&str] = &["http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"];
    crate::child_env::passed(agent_env, ALSO)
}

/// Starts frpc. Not `kill_on_drop`: frpc must survive the agent; the supervisor waits on it
/// while the agent lives, and init reaps it if the agent dies first.
pub fn spawn(binary: &Path, config: &Path, run_dir: &Path) -> io::Result<tokio::process::Child> {
    // O_APPEND: the agent's log forwarder may truncate the file under a running frpc.
    let log = OpenOptions::new().create(true).append(true).mode(0o600).open(log_file(run_dir))?;
    log.set_len(0)?;
    let child = tokio::process::Command::new(binary)
        .args(frpc_args(config))
        .env_clear()
        .envs(frpc_env(std::env::vars_os()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    crate::fsutil::write_atomic(&pidfile(run_dir), format!("{pid}\n").as_bytes())
        .map_err(io::Error::other)?;
    Ok(child)
}

/// True when `cmdline` (NUL-separated, as in /proc) is `binary -c config`.
pub fn cmdline_matches(cmdline: &[u8], binary: &Path, config: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
    let Some(argv0) = args.first() else { return false };
    let name_of = |p: &[u8]| p.rsplit(|&b| b == b'/').next().map(<[u8]>::to_vec);
    let want_name = binary.file_name().map(|n| n.as_encoded_bytes().to_vec());
    let config = config.as_os_str().as_encoded_bytes();
    name_of(argv0) == want_name && args.windows(2).any(|w| w[0] == b"-c" && w[1] == config)
}

fn is_zombie(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may itself hold spaces.
    stat.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z'))
}

/// The frpc this agent started earlier, if it still runs: pidfile, then cmdline check.
pub fn find_running(binary: &Path, config: &Path, run_dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(pidfile(run_dir)).ok()?;
    let pid: u32 = text.trim().parse().ok().filter(|&p| p > 1)?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (cmdline_matches(&cmdline, binary, config) && !is_zombie(pid)).then_some(pid)
}

/// Every other process started with our config (`-c <config>` in its command line) that is not
/// `adopted`: an frpc of ours the agent cannot adopt (its pidfile lost, or started from
/// another path). Left running, it would hold the admin port and the proxies beside the new
/// one, which would fail and be restarted forever.
pub fn find_stale(config: &Path, adopted: Option<u32>) -> Vec<u32> {
    let config = config.as_os_str().as_encoded_bytes();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| Some(*pid) != adopted && *pid != me)
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2).any(|w| w[0] == b"-c" && w[1] == config) && !is_zombie(*pid)
        })
        .collect()
}

/// Sends `signal` to frpc's whole process group (frpc leads it).
pub fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: plain syscall; a group that is already gone gives ESRCH, which is fine.
    unsafe { libc::kill(-(pid as libc::pid_t), signal) };
}

/// How long frpc has to exit after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_must_be_frpc_with_our_config() {
        let bin = Path::new("/usr/bin/frpc");
        let cfg = Path::new("/etc/qudata/frpc.toml");
        assert!(cmdline_matches(b"frpc\0-c\0/etc/qudata/frpc.toml\0", bin, cfg));
        assert!(cmdline_matches(b"/usr/local/bin/frpc\0-c\0/etc/qudata/frpc.toml\0", bin, cfg));
        assert!(!cmdline_matches(b"frpc\0-c\0/etc/other/frpc.toml\0", bin, cfg));
        assert!(!cmdline_matches(b"sleep\0-c\0/etc/qudata/frpc.toml\0", bin, cfg));
        assert!(!cmdline_matches(b"frpc\0/etc/qudata/frpc.toml\0", bin, cfg));
        assert!(!cmdline_matches(b"", bin, cfg));
    }

    #[test]
    fn frpc_gets_none_of_the_agents_secrets() {
        let env =
            [("QUDATA_API_KEY", "ak-1"), ("PATH", "/usr/bin"), ("http_proxy", "http://p:3128")];
        let kept = frpc_env(env.map(|(k, v)| (k.into(), v.into())));
        let names: Vec<_> = kept.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(names, ["PATH", "http_proxy"]);
    }

    #[test]
    fn a_stale_pidfile_finds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // Our own pid: alive, but its cmdline is the test binary, not frpc.
        fs::write(pidfile(dir.path()), format!("{}\n", std::process::id())).unwrap();
        let cfg = dir.path().join("frpc.toml");
        assert_eq!(find_running(Path::new("frpc"), &cfg, dir.path()), None);
        fs::write(pidfile(dir.path()), "garbage").unwrap();
        assert_eq!(find_running(Path::new("frpc"), &cfg, dir.path()), None);
    }
}
