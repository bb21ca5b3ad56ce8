//! The frpc stand-in (`examples/frpc_standin.rs`) and a sandbox of frpc files for one test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use qudata_agent::secret::Secret;
use qudata_agent::tunnel::{Backoff, FrpCredentials, TunnelSettings};

/// The stand-in binary: `target/debug/examples/frpc_standin` (plain build) or
/// `frpc_standin-<hash>` (`cargo test --all-targets` builds examples in test mode), the newer;
/// built here with cargo when neither exists (e.g. `cargo test --test it tunnel::`).
pub fn standin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test exe path");
            // target/debug/deps/it-<hash> → target/debug/examples/
            let dir = exe.parent().and_then(Path::parent).expect("target dir").join("examples");
            if let Some(found) = find_standin(&dir) {
                return found;
            }
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let status = std::process::Command::new(cargo)
                .args(["build", "--example", "frpc_standin"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo");
            assert!(status.success(), "cargo build --example frpc_standin failed");
            find_standin(&dir).expect("frpc_standin built")
        })
        .clone()
}

/// The newest build: a stale plain build must not shadow a fresh test-mode one.
fn find_standin(dir: &Path) -> Option<PathBuf> {
    let builds = std::fs::read_dir(dir).ok()?.filter_map(Result::ok).filter(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name == "frpc_standin" || (name.starts_with("frpc_standin-") && !name.contains('.'))
    });
    let newest = builds.max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?;
    Some(newest.path())
}

/// One test's frpc files, and a guard that kills whatever frpc it left behind.
pub struct Sandbox {
    /// Holds the directory: it is removed when the sandbox is dropped.
    _root: tempfile::TempDir,
    pub config: PathBuf,
    pub run: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let root = tempfile::Builder::new().prefix("qudata-frp-").tempdir().expect("tempdir");
        let config = root.path().join("etc/frpc.toml");
        let run = root.path().join("run");
        Sandbox { _root: root, config, run }
    }

    pub fn settings(&self, binary: &Path, backoff: Backoff) -> TunnelSettings {
        TunnelSettings {
            frpc_binary: binary.to_owned(),
            config_path: self.config.clone(),
            run_dir: self.run.clone(),
            agent_id: "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c".into(),
            agent_port: 18123,
            backoff,
            ready_timeout: Duration::from_secs(10),
        }
    }

    /// Writes the stand-in's control file (crash, refused ports).
    pub fn control(&self, json: serde_json::Value) {
        let path = self.config.with_file_name("standin-control.json");
        std::fs::write(path, json.to_string()).expect("control file");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A failed test must not leave an frpc (stand-in) running: kill its process group.
        let pidfile = self.run.join("frpc.pid");
        let pid = std::fs::read_to_string(pidfile).ok().and_then(|t| t.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| p > 1) {
            // SAFETY: plain syscall on a process group this test started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// A token used only in tests; the product binary must never contain it.
pub const TEST_TOKEN: &str = "frp-test-token-Zq81vLx";

pub fn creds(token: &str) -> FrpCredentials {
    FrpCredentials {
        server_addr: "127.0.0.1".into(),
        server_port: 7000,
        token: Secret::new(token),
        subdomain: "host-a1".into(),
    }
}

/// Back-off short enough for tests (the policy's shape, not its production numbers).
pub const FAST: Backoff = Backoff {
    base: Duration::from_millis(20),
    max: Duration::from_millis(200),
    healthy_after: Duration::from_secs(60),
};
