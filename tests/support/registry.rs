//! A real image registry on 127.0.0.1: Debian's `docker-registry` (the distribution registry,
//! API v2) with its YAML config and storage in a temp dir, on a free port. The test engine
//! treats 127.0.0.0/8 registries as insecure by default, so plain HTTP works for `docker push`
//! and for the agent's pulls. The registry runs in a process group of its own, killed and
//! reaped on `stop` and on drop.

use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::agent::free_port;
use super::wait::wait_until_blocking;

const REGISTRY: &str = "/usr/bin/docker-registry";
/// From spawn to answering `GET /v2/`.
const START: Duration = Duration::from_secs(30);
/// From SIGKILL to reaped.
const REAP: Duration = Duration::from_secs(10);

pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Registry {
    /// Starts an empty registry on a free 127.0.0.1 port.
    pub fn start() -> Registry {
        assert!(
            Path::new(REGISTRY).exists(),
            "{REGISTRY} missing: apt-get install docker-registry"
        );
        let dir = tempfile::Builder::new().prefix("qudata-registry-").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("storage")).unwrap();
        let mut registry = Registry { dir, port: free_port(), child: None };
        registry.spawn();
        registry
    }

    /// `127.0.0.1:<port>`, the host part of its image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Starts it again on the same port and storage (after [`Registry::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        // No auth, no notifications, no proxy: nothing leaves the loopback. The secret only
        // signs upload state between requests of one push.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: qudata-test-{port}\n",
            storage = d.join("storage").display(),
            port = self.port,
        );
        std::fs::write(d.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(d.join("registry.log")).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let what = format!("the registry to answer on {}", self.host());
        wait_until_blocking(what, START, Duration::from_millis(50), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited with {status}: {}", self.log());
            }
            match v2_status(self.port) {
                Some(200) => Ok(()),
                seen => Err(format!("GET /v2/ gave {seen:?}; its log:\n{}", self.log())),
            }
        })
    }

    /// Kills its process group and reaps it: connections to the port are refused after.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on the process group this registry leads (spawned with
        // process_group(0) and not reaped yet, so the id is still ours).
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let deadline = Instant::now() + REAP;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    // Not a panic: this runs in drop, maybe while a test is already failing.
                    eprintln!("docker-registry (pid {}) not reaped within {REAP:?}", child.id());
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("registry log:\n{}", self.log());
        }
        self.stop();
    }
}

/// The status of `GET /v2/` on 127.0.0.1:`port`, or `None` when nothing answers.
fn v2_status(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request =
        format!("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
