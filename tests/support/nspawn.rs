//! A Debian 12 system container booted with systemd (`systemd-nspawn -b`), for the installer's
//! end-to-end test. Its rootfs is made by debootstrap from Debian's mirror with systemd and
//! the packages the production install wants (so the install inside finds them installed),
//! cached as a tarball under the target dir. The container shares the host's network (the
//! test's servers listen on 127.0.0.1); commands run inside through `nsenter` into its PID 1.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::wait::wait_until_blocking;

/// What the rootfs holds besides minbase: systemd as init, and install.sh's production
/// packages (bookworm's own versions: the installer only checks that they are installed).
const PACKAGES: &str = "systemd,systemd-sysv,dbus,passwd,procps,ca-certificates,curl,tar,kmod,\
pciutils,iproute2,nftables,dnsmasq-base,conntrack,qemu-system-x86,qemu-utils,ovmf,dosfstools,mtools";

/// The cached rootfs tarball (built once; serialised by a lock).
pub fn rootfs_tarball() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nspawn");
    std::fs::create_dir_all(&dir).unwrap();
    let tarball = dir.join("bookworm-systemd.tar");
    let lock = File::create(dir.join("build.lock")).unwrap();
    // SAFETY: flock(2) on a descriptor we own; released when `lock` is closed.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    if !tarball.is_file() {
        let work = dir.join("work");
        let _ = std::fs::remove_dir_all(&work);
        let script = r#"mkdir -p "$1"
            debootstrap --variant=minbase --include="$3" bookworm "$1/rootfs" \
              http://deb.debian.org/debian >"$1/debootstrap.log" 2>&1 \
              || { tail -20 "$1/debootstrap.log"; exit 1; }
            tar -C "$1/rootfs" --numeric-owner -cf "$2.partial" .
            mv "$2.partial" "$2"
            rm -rf "$1""#;
        let out = Command::new("bash")
            .args(["-ec", script, "sh"])
            .arg(&work)
            .arg(&tarball)
            .arg(PACKAGES)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "rootfs build failed:\n{said}");
    }
    tarball
}

/// A booted container; powered off (and its process reaped) on drop.
pub struct Container {
    pub root: PathBuf,
    nspawn: Child,
    leader: u32,
    _dir: tempfile::TempDir,
}

impl Container {
    /// Unpacks the rootfs, lets `prepare` write into it, boots it and waits until systemd says
    /// the system is up.
    pub fn boot(prepare: impl FnOnce(&Path)) -> Container {
        let dir = tempfile::Builder::new().prefix("qudata-nspawn-").tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let untar =
            Command::new("tar").arg("-xf").arg(rootfs_tarball()).arg("-C").arg(&root).status();
        assert!(untar.unwrap().success());
        prepare(&root);
        let nspawn = Command::new("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "--quiet", "--console=pipe", "-b", "-D"])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("nspawn.log")).unwrap())
            .spawn()
            .expect("systemd-nspawn (package systemd-container) runs");
        let parent = nspawn.id();
        let leader = wait_until_blocking(
            "the container's PID 1",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || children(parent).into_iter().next().ok_or("not yet"),
        );
        let container = Container { root, nspawn, leader, _dir: dir };
        let what = "the container's systemd to finish booting";
        wait_until_blocking(what, Duration::from_secs(120), Duration::from_millis(250), || {
            let out = container.sh("systemctl is-system-running");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" { Ok(()) } else { Err(state) }
        });
        container
    }

    /// `bash -c script` inside the container, as root, with a clean environment plus `env`.
    pub fn sh_with(&self, script: &str, env: &[(&str, String)]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--", "env", "-i"]);
        cmd.arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(["bash", "-c", script]).output().unwrap()
    }

    pub fn sh(&self, script: &str) -> Output {
        self.sh_with(script, &[])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM to nspawn powers the container off; then it is reaped.
        // SAFETY: kill(2) on the nspawn process this harness spawned and has not reaped.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < until {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The children of `pid`, from `/proc/<pid>/task/<pid>/children`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
