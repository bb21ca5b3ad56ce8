//! A real OpenSSH server as a stand-in guest: its own host key, config and `authorized_keys`
//! in a temp dir, on 127.0.0.1:<free port>. Reaped on drop.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait::wait_until_blocking;

const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// Runs `ssh-keygen` to make an unencrypted ed25519 key at `path` (and `path.pub`).
pub fn keygen(path: &Path) -> String {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(status.success());
    fs::read_to_string(format!("{}.pub", path.display())).unwrap().trim().to_owned()
}

impl Sshd {
    /// Starts sshd that lets in exactly the keys in `authorized` (one line each).
    pub fn start(authorized: &[&str]) -> Sshd {
        assert!(Path::new(SSHD).exists(), "{SSHD} missing: apt-get install openssh-server");
        // Privilege separation needs this directory; the package creates it only at boot.
        fs::create_dir_all("/run/sshd").unwrap();
        let dir = tempfile::Builder::new().prefix("qudata-sshd-").tempdir().unwrap();
        fs::create_dir(dir.path().join("run")).unwrap();
        let mut keys = authorized.join("\n");
        keys.push('\n');
        fs::write(dir.path().join("authorized_keys"), keys).unwrap();
        keygen(&dir.path().join("host_ed25519"));
        let mut sshd = Sshd { dir, port: 0, child: None };
        sshd.spawn();
        sshd
    }

    /// The `authorized_keys` file this sshd reads.
    pub fn authorized_keys(&self) -> PathBuf {
        self.dir.path().join("authorized_keys")
    }

    /// A scratch directory for the guest-side run dir.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// What sshd has logged so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Stops sshd and starts it again on the same port; with `new_host_key`, as a different
    /// machine would answer.
    pub fn restart(&mut self, new_host_key: bool) {
        self.stop();
        if new_host_key {
            keygen(&self.dir.path().join("host_ed25519"));
        }
        self.spawn();
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        if self.port == 0 {
            self.port = free_port();
        }
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nPidFile none\nLogLevel VERBOSE\nMaxStartups 100\n",
            port = self.port,
            d = d.display()
        );
        fs::write(d.join("sshd_config"), config).unwrap();
        let log = fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let what = format!("sshd to listen on 127.0.0.1:{}", self.port);
        wait_until_blocking(what, Duration::from_secs(20), Duration::from_millis(50), || {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sshd exited with {status}: {}", self.log());
            }
            Err(format!("its log:\n{}", self.log()))
        })
    }

    /// Stops sshd (kill + wait); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Logs in with the real OpenSSH client and runs `true`: the second opinion on a key.
pub fn openssh_login(port: u16, identity: &Path, known_hosts: &Path) -> Result<(), String> {
    let mut child = Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=10"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(identity)
        .args(["-p", &port.to_string(), "root@127.0.0.1", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh (openssh-client) is installed");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    if status.success() { Ok(()) } else { Err(format!("{status}: {stderr}")) }
}
