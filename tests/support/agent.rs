//! Starts the real `qudata-agent` binary in a private data/run dir and talks to its API.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::wait::{wait_until, wait_until_blocking};

/// A temporary root with the agent's data and run dirs.
pub struct Dirs {
    /// Dropped first: the agent's bridge, tables and dnsmasq go before its dirs.
    pub net: super::net::TestNet,
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub run: PathBuf,
    /// `QUDATA_HOST_PORTS` of this test's agents: a slice no other test's agent allocates
    /// from. Each agent only knows its own instances, so two tests sharing a range could both
    /// hand out a port while neither listens on it yet (or while its VM is stopped).
    pub host_ports: String,
}

/// The tests' slices lie above the product's default host ports (20000-22999) and agent ports
/// (23000-29999) and below the kernel's ephemeral range (32768), so neither a client socket
/// nor a default-configured agent takes one.
const TEST_HOST_PORTS: std::ops::Range<u32> = 30000..32760;
const SLICE: u32 = 24;

pub fn next_host_port_slice() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let slices = TEST_HOST_PORTS.len() as u32 / SLICE;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % slices;
    let first = TEST_HOST_PORTS.start + n * SLICE;
    format!("{first}-{}", first + SLICE - 1)
}

impl Dirs {
    pub fn new() -> Dirs {
        let root = tempfile::Builder::new().prefix("qudata-test-").tempdir().expect("tempdir");
        // Like /var/lib and /run: QEMU's unprivileged user may pass through to its VM's files.
        use std::os::unix::fs::PermissionsExt;
        let traverse = std::fs::Permissions::from_mode(0o711);
        std::fs::set_permissions(root.path(), traverse).expect("chmod the test root");
        let data = root.path().join("data");
        let run = root.path().join("run");
        // The agents' kernel log: empty until a test writes records into it.
        std::fs::write(root.path().join("kmsg"), "").expect("the fake kernel log");
        let host_ports = next_host_port_slice();
        Dirs { net: super::net::TestNet::new(&run), root, data, run, host_ports }
    }

    /// A small qcow2 base image in the test's dir, for agents whose VMs never boot (their
    /// GPUs are simulated): its path.
    pub fn unbootable_base_image(&self) -> String {
        let path = self.root.path().join("base.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("64M")
            .output()
            .expect("qemu-img");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        path.display().to_string()
    }

    /// The kernel log the test's agents watch (`QUDATA_KMSG_PATH`), in `/dev/kmsg`'s format.
    pub fn kmsg(&self) -> PathBuf {
        self.root.path().join("kmsg")
    }

    /// Instance record files, by name.
    pub fn records(&self) -> Vec<String> {
        match std::fs::read_dir(self.data.join("instances")) {
            Ok(entries) => {
                entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

/// A test that fails half-way leaves its VMs running (QEMU outlives the agent on purpose):
/// they go with the test's dirs, found by their pidfile under its run dir.
impl Drop for Dirs {
    fn drop(&mut self) {
        let run = self.run.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("qemu-system") && cmdline.contains(&run) {
                // SAFETY: kill(2) on a QEMU whose command line names this test's run dir.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn has_image(env: &[(&str, String)]) -> bool {
    env.iter().any(|(k, _)| *k == "QUDATA_BASE_IMAGE")
}

/// `qudata-agent recover` on the test's dirs, with a clean environment; add args and settings.
pub fn recover_command(dirs: &Dirs) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qudata-agent"));
    cmd.arg("recover")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("QUDATA_DATA_DIR", &dirs.data)
        .env("QUDATA_RUN_DIR", &dirs.run)
        .env("QUDATA_FRPC_CONFIG", dirs.root.path().join("etc/frpc.toml"))
        .envs(dirs.net.env());
    cmd
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// Where every agent's output of this test run is kept, for the secret scan of the whole run.
pub fn log_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running agent process.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    output: Arc<Mutex<String>>,
    /// The threads copying stdout and stderr; done once the pipes close.
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    file: PathBuf,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            use std::io::Write;
            let _ = writeln!(log, "{line}");
            let mut out = output.lock().unwrap();
            out.push_str(&line);
            out.push('\n');
        }
    })
}

impl Agent {
    /// Starts `qudata-agent <args>` with a clean environment plus `env`.
    pub fn start(dirs: &Dirs, args: &[&str], env: &[(&str, String)], port: u16) -> Agent {
        Agent::start_via(&[], dirs, args, env, port)
    }

    /// The same, run through `wrapper` (a program and its arguments, the agent's path and
    /// `args` appended), e.g. a sandbox.
    pub fn start_via(
        wrapper: &[String],
        dirs: &Dirs,
        args: &[&str],
        env: &[(&str, String)],
        port: u16,
    ) -> Agent {
        // Benchmarks compare with another build of the agent (`QUDATA_BENCH_AGENT`).
        let binary = std::env::var("QUDATA_BENCH_AGENT")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_qudata-agent").to_owned());
        let binary = binary.as_str();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("QUDATA_DATA_DIR", &dirs.data)
            .env("QUDATA_RUN_DIR", &dirs.run)
            // frpc's files stay in the test's dir, never /etc/qudata.
            .env("QUDATA_FRPC_CONFIG", dirs.root.path().join("etc/frpc.toml"))
            .env("QUDATA_AGENT_PORT", port.to_string())
            .env("QUDATA_KMSG_PATH", dirs.kmsg())
            .env("QUDATA_HOST_PORTS", &dirs.host_ports)
            .envs(dirs.net.env())
            .env("QUDATA_DEBUG", "true")
            // Without a base image `auto` finds no backend and the agent stops (and the host's
            // own Docker engine is never the tests' business): tests that give no image get
            // the explicit VM backend, which serves and answers creates 503 with the reason.
            .env("QUDATA_BACKEND", if has_image(env) { "auto" } else { "qemu" })
            .env("QUDATA_DOCKER_HOST", "/nonexistent/docker.sock")
            // The Docker tests' images are imported into the test engine and no registry has
            // them: under the default `always` every create would send a pull to docker.io.
            // Tests of pulling set `always` themselves, against a registry on 127.0.0.1.
            .env("QUDATA_DOCKER_PULL", "missing")
            .env("RUST_LOG", "debug,hyper=info,reqwest=info,h2=info,rustls=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn qudata-agent");
        let output = Arc::new(Mutex::new(String::new()));
        let log_file = log_dir().join(format!("agent-{}.log", child.id()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), output.clone(), log_file.clone()),
            collect(child.stderr.take().unwrap(), output.clone(), log_file.clone()),
        ];
        Agent { child: Some(child), port, output, readers }
    }

    /// Local mode on a fresh port.
    pub fn local(dirs: &Dirs) -> Agent {
        Agent::start(dirs, &["run", "--local"], &[], free_port())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the agent printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits (deadline 60 s) until `GET /ping` answers.
    pub async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let url = self.url("/ping");
        let what = format!("the agent to serve {url}");
        wait_until(what, Duration::from_secs(60), Duration::from_millis(50), async || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status} before serving:\n{}", self.output());
            }
            let answer = match client.get(&url).send().await {
                Ok(r) if r.status() == 200 => return Ok(()),
                Ok(r) => r.status().to_string(),
                Err(e) => e.to_string(),
            };
            Err(format!("{answer}; the agent's output:\n{}", self.output()))
        })
        .await
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SIGTERM`, then waits (deadline 30 s) for the exit status. An agent that ignores it
    /// fails the test, and the unwinding drops this `Agent`, which kills it.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait_exited("the agent to exit on SIGTERM")
    }

    /// Waits for the process to exit on its own (deadline 30 s).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let status = self.wait_exited("the agent to exit");
        self.drain();
        status
    }

    /// Polls the child until it exited (deadline 30 s), then forgets it.
    fn wait_exited(&mut self, what: &str) -> ExitStatus {
        let status =
            wait_until_blocking(what, Duration::from_secs(30), Duration::from_millis(20), || {
                match self.child.as_mut().expect("running").try_wait().unwrap() {
                    Some(status) => Ok(status),
                    None => Err(format!("still running; its output:\n{}", self.output())),
                }
            });
        self.child = None;
        status
    }

    /// Waits (deadline 10 s) until the reader threads have copied everything the agent
    /// printed; a process the agent started may still hold the pipes, hence the deadline.
    /// Not [`wait_until_blocking`]: running into this deadline is no failure, the output read
    /// so far is all there is.
    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A client for the agent API that sends `X-Agent-Secret` when given one.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub secret: Option<String>,
    http: reqwest::Client,
}

/// An answer: status and parsed JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
}

impl Api {
    pub fn new(agent: &Agent, secret: Option<&str>) -> Api {
        Api {
            base: agent.url(""),
            secret: secret.map(str::to_owned),
            // Longer than the 30 s the agent lets a command wait for a running operation. No
            // pooled connections: the agent closes idle ones after 10 s, and a test that blocks
            // its runtime (ssh, ip) never sees the close before it reuses one.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(s) = &self.secret {
            req = req.header("X-Agent-Secret", s);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req.send().await.expect("agent answered");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, body, content_type }
    }

    pub async fn json(&self, method: &str, path: &str, body: &Value) -> Answer {
        self.call(method, path, Some(serde_json::to_vec(body).unwrap())).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }
}

/// The local secret the agent made in `dirs`.
pub fn local_secret(dirs: &Dirs) -> String {
    std::fs::read_to_string(dirs.data.join("local-secret")).unwrap().trim().to_owned()
}
