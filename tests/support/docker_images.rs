//! Container images for the tests, built from Debian packages (no registry is reachable):
//! a busybox image (Debian's static busybox and its applet links) and a Debian image made by
//! `debootstrap --include=openssh-server` on the host, where the Debian mirror is reachable.
//! Tarballs are cached under the target dir; building twice at once is serialised by a lock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::docker::Engine;

pub const BUSYBOX: &str = "qudata-test/busybox:1";
pub const DEBIAN_SSHD: &str = "qudata-test/debian-sshd:bookworm";

fn cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-images");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sh(script: &str, args: &[&Path]) {
    let out = Command::new("bash").arg("-ec").arg(script).arg("sh").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "image build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Holds an exclusive lock on `<cache>/<name>.lock` while `build` makes `tarball`.
fn cached(name: &str, build: impl FnOnce(&Path, &Path)) -> PathBuf {
    let dir = cache();
    let tarball = dir.join(format!("{name}.tar"));
    let lock = File::create(dir.join(format!("{name}.lock"))).unwrap();
    // SAFETY: flock(2) on a file descriptor we own; released when `lock` is closed.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    if !tarball.is_file() {
        let work = dir.join(format!("{name}.work"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let partial = dir.join(format!("{name}.tar.partial"));
        build(&work, &partial);
        std::fs::rename(&partial, &tarball).unwrap();
        let _ = std::fs::remove_dir_all(&work);
    }
    tarball
}

/// The busybox rootfs tarball: `/bin/busybox` (static) and one link per applet.
pub fn busybox_tarball() -> PathBuf {
    cached("busybox", |work, out| {
        sh(
            r#"cd "$1"
               apt-get download -q busybox-static >/dev/null 2>&1 || apt-get download busybox-static
               dpkg-deb -x busybox-static_*.deb pkg
               mkdir -p rootfs/bin rootfs/tmp rootfs/root
               cp pkg/bin/busybox rootfs/bin/busybox
               for a in $(rootfs/bin/busybox --list); do
                 [ "$a" = busybox ] || ln -s busybox "rootfs/bin/$a"
               done
               tar -C rootfs -cf "$2" ."#,
            &[work, out],
        );
    })
}

/// The Debian rootfs tarball with OpenSSH's server installed (and its host keys made by the
/// package's own scripts).
pub fn debian_sshd_tarball() -> PathBuf {
    cached("debian-sshd", |work, out| {
        sh(
            r#"debootstrap --variant=minbase --include=openssh-server bookworm "$1/rootfs" \
                 http://deb.debian.org/debian >"$1/debootstrap.log" 2>&1 \
                 || { tail -20 "$1/debootstrap.log"; exit 1; }
               tar -C "$1/rootfs" --numeric-owner -cf "$2" ."#,
            &[work, out],
        );
    })
}

pub fn busybox(engine: &Engine) -> &'static str {
    engine.import(&busybox_tarball(), BUSYBOX);
    BUSYBOX
}

pub fn debian_sshd(engine: &Engine) -> &'static str {
    engine.import(&debian_sshd_tarball(), DEBIAN_SSHD);
    DEBIAN_SSHD
}
