//! The real `install.sh` in production mode against a temporary root (`--root DIR`): frpc and
//! the base image are served from file:// URLs with their SHA-256.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::wait::wait_until_blocking;

use sha2::{Digest, Sha256};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const AGENT: &str = env!("CARGO_BIN_EXE_qudata-agent");

pub const KEY: &str = "ak-install-test-7f3c9e1d";
pub const FRPC_SCRIPT: &[u8] = b"#!/bin/sh\necho frpc stand-in for the installer\n";

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A temporary root to install into, and the downloads it is served from.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub src: PathBuf,
    pub frpc_sum: String,
    pub image: Vec<u8>,
}

impl Fixture {
    /// `grub`: whether the root has an /etc/default/grub (a GRUB host).
    pub fn new(grub: bool) -> Fixture {
        Fixture::with_image(grub, 200_000)
    }

    /// The same with a base image of `image_bytes`.
    pub fn with_image(grub: bool, image_bytes: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let src = dir.path().join("src");
        std::fs::create_dir_all(root.join("etc/default")).unwrap();
        if grub {
            std::fs::write(root.join("etc/default/grub"), "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n")
                .unwrap();
        }
        // The layout of frp's release archive: frp_<version>_linux_amd64/frpc.
        let frp = src.join("frp_0.61.0_linux_amd64");
        std::fs::create_dir_all(&frp).unwrap();
        std::fs::write(frp.join("frpc"), FRPC_SCRIPT).unwrap();
        std::fs::set_permissions(frp.join("frpc"), PermissionsExt::from_mode(0o755)).unwrap();
        let tar = Command::new("tar")
            .args(["-czf", "frp.tar.gz", "frp_0.61.0_linux_amd64"])
            .current_dir(&src)
            .status()
            .unwrap();
        assert!(tar.success());
        let frpc_sum = sha256_hex(&std::fs::read(src.join("frp.tar.gz")).unwrap());
        let image: Vec<u8> =
            (0..image_bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        std::fs::write(src.join("base.qcow2"), &image).unwrap();
        Fixture { _dir: dir, root, src, frpc_sum, image }
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("INSTALL_AGENT_BINARY", AGENT.into()),
            ("INSTALL_FRPC_URL", format!("file://{}", self.src.join("frp.tar.gz").display())),
            ("INSTALL_FRPC_SHA256", self.frpc_sum.clone()),
            ("INSTALL_IMAGE_URL", format!("file://{}", self.src.join("base.qcow2").display())),
            ("INSTALL_IMAGE_SHA256", sha256_hex(&self.image)),
            ("QUDATA_API_KEY", KEY.into()),
        ]
    }

    /// `bash install.sh --root <root> <args>` with a clean environment plus `env` (a value
    /// of `None` drops the variable).
    pub fn install(&self, args: &[&str], env: &[(&str, Option<String>)]) -> Run {
        let mut vars: BTreeMap<&str, String> = self.env().into_iter().collect();
        for (k, v) in env {
            match v {
                Some(v) => vars.insert(k, v.clone()),
                None => vars.remove(k),
            };
        }
        let out = Command::new("bash")
            .arg(Path::new(REPO).join("install.sh"))
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .envs(vars)
            .output()
            .unwrap();
        Run::from(out)
    }

    pub fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    pub fn mode(&self, path: &str) -> u32 {
        std::fs::metadata(self.at(path)).unwrap().permissions().mode() & 0o7777
    }

    /// Every path under the root with what would show a change: inode, size, mtime, mode.
    pub fn tree(&self) -> BTreeMap<String, (u64, u64, i64, i64, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let m = std::fs::symlink_metadata(&path).unwrap();
                if m.is_dir() {
                    stack.push(path.clone());
                }
                let rel = path.strip_prefix(&self.root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.mode()));
            }
        }
        out
    }
}

/// The release artefact (`scripts/dist.sh`) of the agent under test, made in `out`; its
/// `.sha256` beside it.
pub fn make_release(out: &Path) -> PathBuf {
    let made = Command::new(Path::new(REPO).join("scripts/dist.sh"))
        .args(["--binary", AGENT, "--out"])
        .arg(out)
        .current_dir(REPO)
        .output()
        .unwrap();
    assert!(made.status.success(), "dist.sh: {}", String::from_utf8_lossy(&made.stderr));
    out.join(RELEASE)
}

/// The artefact's file name (install.sh's `RELEASE_NAME`).
pub const RELEASE: &str = "qudata-agent-x86_64-linux.tar.gz";

impl Fixture {
    /// `install.sh` as the one-line install runs it: its text on standard input of
    /// `bash -s -- <args>`, from a directory with nothing in it (no checkout), with
    /// `--root <root>` and the fixture's downloads but no agent binary and no key in the
    /// environment (the key is an argument).
    pub fn install_piped(&self, args: &[&str], env: &[(&str, String)]) -> Run {
        let empty = tempfile::tempdir().unwrap();
        let mut vars: BTreeMap<&str, String> = self.env().into_iter().collect();
        vars.remove("INSTALL_AGENT_BINARY");
        vars.remove("QUDATA_API_KEY");
        vars.extend(env.iter().cloned());
        let script = std::fs::File::open(Path::new(REPO).join("install.sh")).unwrap();
        let out = Command::new("bash")
            .args(["-s", "--", "--root"])
            .arg(&self.root)
            .args(args)
            .current_dir(empty.path())
            .stdin(script)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .envs(vars)
            .output()
            .unwrap();
        Run::from(out)
    }
}

pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub text: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(KEY), "the API key was echoed:\n{text}");
        Run { ok: out.status.success(), code: out.status.code(), text }
    }
}

/// `python3 -m http.server` on 127.0.0.1 serving `dir`; killed and reaped on drop.
pub struct HttpServer {
    child: std::process::Child,
    pub port: u16,
}

impl HttpServer {
    pub fn serve(dir: &Path) -> HttpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 (tests/packages.txt) runs");
        let what = format!("http.server to listen on 127.0.0.1:{port}");
        let (limit, every) = (Duration::from_secs(30), Duration::from_millis(50));
        wait_until_blocking(what, limit, every, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop)
        });
        HttpServer { child, port }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
