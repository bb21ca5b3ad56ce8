//! The frpc stand-in (`examples/frpc_standin.rs`) and a sandbox of frpc files for one test.

#![allow(dead_code)] // each test binary uses a different part of the support code

use std::path::{Path, PathBuf};
use std::time::Duration;

use qudata_agent::secret::Secret;
use qudata_agent::tunnel::{Backoff, FrpCredentials, TunnelSettings};

/// The stand-in binary, built by `cargo test --all-targets` next to this test's exe.
pub fn standin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    // target/debug/deps/tunnel-<hash> → target/debug/examples/frpc_standin
    let path =
        exe.parent().and_then(Path::parent).expect("target dir").join("examples/frpc_standin");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --all-targets` or `cargo build --example frpc_standin`",
        path.display()
    );
    path
}

/// One test's frpc files, and a guard that kills whatever frpc it left behind.
pub struct Sandbox {
    pub root: tempfile::TempDir,
    pub config: PathBuf,
    pub run: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let root = tempfile::Builder::new().prefix("qudata-frp-").tempdir().expect("tempdir");
        let config = root.path().join("etc/frpc.toml");
        let run = root.path().join("run");
        Sandbox { root, config, run }
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
