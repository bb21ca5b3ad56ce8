//! A real Docker engine for the tests: Debian's `dockerd` on a private socket, data-root and
//! exec-root under the test run's temp dir, and images imported from rootfs tarballs (no
//! registry is reachable here).
//!
//! Networking: each engine gets a bridge of its own (`qdt…`, made here) and runs with
//! `--iptables=false --ip-masq=false`. Docker's default `docker0` bridge and its iptables
//! chains are host-global: two engines (the shared one and the one a test stops) would fight
//! over them, and the chains set the host's FORWARD policy to DROP. Without iptables, a
//! published port is served by `docker-proxy` listening on exactly the host IP asked for
//! (127.0.0.1), which is what the agent relies on and what the tests check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use super::wait::wait_until_blocking;

/// From start to the socket answering (the first start also initialises the data root).
const ENGINE_START: Duration = Duration::from_secs(90);
/// From SIGTERM to exit: the engine stops its containers first (10 s grace each).
const ENGINE_STOP: Duration = Duration::from_secs(60);

/// One private engine. Dropping it stops it and removes its bridge.
pub struct Engine {
    pub dir: PathBuf,
    pub socket: PathBuf,
    bridge: String,
    running: Mutex<Option<Running>>,
}

struct Running {
    pid: u32,
    exited: mpsc::Receiver<()>,
}

fn engines_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-engines")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// What an earlier test run left when it was killed: its engines (by their pidfile, only if
/// that process still runs from that directory), mounts, bridges and files.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(engines_dir()) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner: u32 = name.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if owner == std::process::id() || (owner != 0 && pid_alive(owner)) {
            continue; // a live engine of another test process (a bench, a second run)
        }
        if let Some(pid) = std::fs::read_to_string(dir.join("docker.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                // SAFETY: kill(2) on a dockerd this harness started (checked by its cmdline).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        unmount_under(&dir);
        if let Ok(bridge) = std::fs::read_to_string(dir.join("bridge")) {
            let _ = Command::new("ip").args(["link", "del", bridge.trim()]).output();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Bridges whose engine directory is gone (a run killed between the two removals).
    let live: Vec<String> = std::fs::read_dir(engines_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("bridge")).ok())
        .map(|b| b.trim().to_owned())
        .collect();
    let links = Command::new("ip").args(["-br", "link"]).output().map(|o| o.stdout);
    let links = String::from_utf8_lossy(&links.unwrap_or_default()).into_owned();
    for name in links.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with("qdt") && !live.iter().any(|b| b == name) {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
}

fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).output();
    }
}

impl Engine {
    /// The engine shared by every test of the process (started on first use).
    pub fn shared() -> &'static Engine {
        static SHARED: OnceLock<Engine> = OnceLock::new();
        SHARED.get_or_init(Engine::start_new)
    }

    /// A fresh engine of its own (for a test that stops it).
    pub fn start_new() -> Engine {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(sweep_stale);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = engines_dir().join(format!("{pid}-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let bridge = format!("qdt{}", (pid * 4 + n) % 1_000_000);
        let subnet_octet = (pid * 4 + n) % 200 + 20;
        std::fs::write(dir.join("bridge"), &bridge).unwrap();
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        run(Command::new("ip").args(["link", "add", "name", &bridge, "type", "bridge"]));
        let address = format!("10.213.{subnet_octet}.1/24");
        run(Command::new("ip").args(["addr", "add", &address, "dev", &bridge]));
        run(Command::new("ip").args(["link", "set", &bridge, "up"]));
        let engine =
            Engine { socket: dir.join("docker.sock"), dir, bridge, running: Mutex::new(None) };
        engine.start();
        engine
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts `dockerd` (again, on the same data root) and waits until it answers.
    pub fn start(&self) {
        let mut running = self.running.lock().unwrap();
        assert!(running.is_none(), "engine already running");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .args(["--bridge", &self.bridge, "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("dockerd.log")).unwrap());
        // SAFETY: prctl in the child before exec, async-signal-safe. The engine dies with the
        // thread that started it, which lives exactly as long as this test process.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let (pid_tx, pid_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel();
        // A thread of its own spawns and reaps the engine.
        std::thread::spawn(move || {
            let mut child = cmd.spawn().expect("spawn dockerd (apt-get install docker.io)");
            pid_tx.send(child.id()).unwrap();
            let _ = child.wait();
            let _ = exit_tx.send(());
        });
        let pid = pid_rx.recv().unwrap();
        *running = Some(Running { pid, exited: exit_rx });
        drop(running);
        let what = format!("dockerd to answer on {}", self.host());
        wait_until_blocking(what, ENGINE_START, Duration::from_millis(200), || {
            let version = self.cli(&["version", "--format", "{{.Server.Version}}"]);
            if version.status.success() {
                return Ok(());
            }
            let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
            Err(format!("{}dockerd.log:\n{log}", String::from_utf8_lossy(&version.stderr)))
        })
    }

    /// SIGTERM, then waits for the engine to exit (SIGKILL at the deadline).
    pub fn stop(&self) {
        let Some(running) = self.running.lock().unwrap().take() else { return };
        // SAFETY: kill(2) on the dockerd this harness spawned and has not reaped yet.
        unsafe { libc::kill(running.pid as i32, libc::SIGTERM) };
        if running.exited.recv_timeout(ENGINE_STOP).is_err() {
            // SAFETY: as above.
            unsafe { libc::kill(running.pid as i32, libc::SIGKILL) };
            let _ = running.exited.recv_timeout(Duration::from_secs(10));
        }
    }

    /// The real `docker` CLI against this engine.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("docker").arg("-H").arg(self.host()).args(args).output().expect("docker CLI")
    }

    /// [`Engine::cli`] that must succeed; its stdout, trimmed.
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Imports a tarball as `name` unless the engine has it.
    pub fn import(&self, tarball: &Path, name: &str) {
        if self.cli(&["image", "inspect", name]).status.success() {
            return;
        }
        self.must(&["import", &tarball.to_string_lossy(), name]);
    }

    /// `docker inspect -f <format> <container>`, or `None` when there is no such container.
    pub fn inspect(&self, container: &str, format: &str) -> Option<String> {
        let out = self.cli(&["inspect", "-f", format, container]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Names of every container (any state) carrying `label`.
    pub fn labelled(&self, label: &str) -> Vec<String> {
        let filter = format!("label={label}");
        let out = self.must(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]);
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
