//! Where one VM's files live. Every path derives from the data dir, the run dir and the
//! instance id alone, so recovery finds (and cleans) them from the record, or from nothing.

use std::path::{Path, PathBuf};

/// The files of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    /// `<data>/vms/<id>`: survives reboots (disk, firmware variables, pinned host key).
    pub dir: PathBuf,
    pub overlay: PathBuf,
    pub vars: PathBuf,
    pub seed: PathBuf,
    pub serial_log: PathBuf,
    /// The serial log's previous part: the last QEMU's, or the tail cut off by
    /// [`VmPaths::cap_serial_log`].
    pub serial_log_old: PathBuf,
    /// QEMU's own stdout and stderr.
    pub qemu_log: PathBuf,
    pub known_hosts: PathBuf,
    /// `<run>/vms/<id>`: gone after a host reboot, like the process it describes.
    pub run_dir: PathBuf,
    /// `<run>/qmp/<id>.sock`: the monitor, bound by the agent in a directory only root may
    /// change (see `qmp::socket`).
    pub qmp: PathBuf,
    /// Where QEMU bound its monitor itself, for VMs started by agents before `qmp`.
    pub legacy_qmp: PathBuf,
    pub pidfile: PathBuf,
}

impl VmPaths {
    pub fn new(data_dir: &Path, run_dir: &Path, id: &str) -> VmPaths {
        let dir = data_dir.join("vms").join(id);
        let run = run_dir.join("vms").join(id);
        VmPaths {
            overlay: dir.join("disk.qcow2"),
            vars: dir.join("OVMF_VARS.fd"),
            seed: dir.join("seed.img"),
            serial_log: dir.join("serial.log"),
            serial_log_old: dir.join("serial.log.1"),
            qemu_log: dir.join("qemu.log"),
            known_hosts: dir.join("known_hosts"),
            qmp: run_dir.join("qmp").join(format!("{id}.sock")),
            legacy_qmp: run.join("qmp.sock"),
            pidfile: run.join("qemu.pid"),
            dir,
            run_dir: run,
        }
    }

    /// The monitor socket to connect to: the agent's, or where an older agent's QEMU bound it.
    pub fn monitor(&self) -> &Path {
        if !self.qmp.exists() && self.legacy_qmp.exists() { &self.legacy_qmp } else { &self.qmp }
    }

    /// Removes both directories and everything in them, and the monitor socket; what is
    /// already gone is fine.
    pub fn remove_all(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.qmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for dir in [&self.dir, &self.run_dir] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every file the agent makes for a VM, in both directories.
    pub fn files(&self) -> [&Path; 10] {
        [
            &self.overlay,
            &self.vars,
            &self.seed,
            &self.serial_log,
            &self.serial_log_old,
            &self.qemu_log,
            &self.known_hosts,
            &self.qmp,
            &self.legacy_qmp,
            &self.pidfile,
        ]
    }

    /// Removes the files of [`VmPaths::files`], then each directory if that left it empty.
    /// Anything else in them is left alone (the agent did not make it). Returns the removed
    /// paths; what is already gone is fine.
    pub fn remove_known(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for path in self.files() {
            match std::fs::remove_file(path) {
                Ok(()) => removed.push(path.to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for dir in [&self.dir, &self.run_dir] {
            // Fails on a directory that still holds something: that is the point.
            if std::fs::remove_dir(dir).is_ok() {
                removed.push(dir.clone());
            }
        }
        Ok(removed)
    }

    /// The last `lines` non-empty lines of the serial log, for an error message (only its
    /// tail is read: the guest decides how much it writes).
    pub fn serial_tail(&self, lines: usize) -> String {
        let text = read_tail(&self.serial_log, SERIAL_TAIL_BYTES);
        let tail: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        tail[tail.len().saturating_sub(lines)..].join(" | ")
    }

    /// A fresh serial log for a new QEMU: the last one becomes `serial.log.1`.
    pub fn rotate_serial_log(&self) -> std::io::Result<()> {
        match std::fs::rename(&self.serial_log, &self.serial_log_old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// An empty serial log for QEMU to append to (created, never through a link).
    pub fn create_serial_log(&self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&self.serial_log)
            .map(drop)
    }

    /// Keeps the serial log under `max` bytes while QEMU writes it (opened with `O_APPEND`, so
    /// its writes go on at the new end): past `max`, its last `keep` bytes go to
    /// `serial.log.1` and it starts again empty. Returns whether it was cut.
    pub fn cap_serial_log(&self, max: u64, keep: u64) -> std::io::Result<bool> {
        if self.serial_len() <= max {
            return Ok(false);
        }
        let tail = read_tail(&self.serial_log, keep);
        crate::fsutil::write_atomic(&self.serial_log_old, tail.as_bytes())
            .map_err(std::io::Error::other)?;
        use std::os::unix::fs::OpenOptionsExt;
        let mut log = std::fs::OpenOptions::new();
        log.write(true).custom_flags(libc::O_NOFOLLOW);
        log.open(&self.serial_log)?.set_len(0)?;
        Ok(true)
    }

    /// The serial log's current length (0 when it does not exist).
    pub fn serial_len(&self) -> u64 {
        std::fs::symlink_metadata(&self.serial_log).map_or(0, |m| m.len())
    }

    /// QEMU's own output from `start` on (one QEMU's run), at most its last `bytes`.
    pub fn qemu_log_since(&self, start: u64, bytes: u64) -> String {
        let len = std::fs::metadata(&self.qemu_log).map_or(0, |m| m.len());
        read_tail(&self.qemu_log, bytes.min(len.saturating_sub(start)))
    }

    /// The length of QEMU's own log (where the next QEMU's output starts).
    pub fn qemu_log_len(&self) -> u64 {
        std::fs::metadata(&self.qemu_log).map_or(0, |m| m.len())
    }
}

/// How much of the serial log [`VmPaths::serial_tail`] reads.
const SERIAL_TAIL_BYTES: u64 = 16 << 10;

pub use crate::fsutil::read_tail;

#[cfg(test)]
mod serial_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_serial_log_is_cut_past_its_cap_and_its_tail_kept() {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths::new(dir.path(), dir.path(), "i-1");
        std::fs::create_dir_all(&paths.dir).unwrap();
        // Opened as QEMU opens it (append=on), and written on after the cut.
        let mut qemu =
            std::fs::OpenOptions::new().create(true).append(true).open(&paths.serial_log).unwrap();
        qemu.write_all(&vec![b'x'; 1000]).unwrap();
        qemu.write_all(b"\nlast line\n").unwrap();
        assert!(!paths.cap_serial_log(4096, 64).unwrap(), "under the cap: untouched");
        assert!(paths.cap_serial_log(512, 64).unwrap());
        assert_eq!(paths.serial_len(), 0);
        let old = std::fs::read_to_string(&paths.serial_log_old).unwrap();
        assert!(old.len() <= 64 && old.ends_with("last line\n"), "{old:?}");
        qemu.write_all(b"after the cut\n").unwrap();
        assert_eq!(std::fs::read_to_string(&paths.serial_log).unwrap(), "after the cut\n");
        paths.rotate_serial_log().unwrap();
        assert_eq!(std::fs::read_to_string(&paths.serial_log_old).unwrap(), "after the cut\n");
        assert_eq!(paths.serial_len(), 0);
        paths.rotate_serial_log().unwrap(); // nothing to rotate is fine
    }

    /// An escaped QEMU that put links where the agent reads and writes as root gets nothing:
    /// the target is neither cut, read into an error message, nor written.
    #[test]
    fn links_in_place_of_the_logs_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths::new(dir.path(), dir.path(), "i-1");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let secret = dir.path().join("someone-elses-disk");
        std::fs::write(&secret, vec![b's'; 8192]).unwrap();
        std::os::unix::fs::symlink(&secret, &paths.serial_log).unwrap();
        assert!(!matches!(paths.cap_serial_log(512, 64), Ok(true)), "a link is not cut");
        assert_eq!(std::fs::metadata(&secret).unwrap().len(), 8192, "the target was cut");
        assert_eq!(paths.serial_tail(3), "", "the target was read");
        assert!(paths.create_serial_log().is_err(), "a link is not a fresh log");
        assert_eq!(std::fs::metadata(&secret).unwrap().len(), 8192);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_derive_from_the_id_only() {
        let p = VmPaths::new(Path::new("/d"), Path::new("/r"), "abc");
        assert_eq!(p.overlay, Path::new("/d/vms/abc/disk.qcow2"));
        assert_eq!(p.vars, Path::new("/d/vms/abc/OVMF_VARS.fd"));
        assert_eq!(p.seed, Path::new("/d/vms/abc/seed.img"));
        assert_eq!(p.qmp, Path::new("/r/qmp/abc.sock"));
        assert_eq!(p.legacy_qmp, Path::new("/r/vms/abc/qmp.sock"));
        assert_eq!(p.pidfile, Path::new("/r/vms/abc/qemu.pid"));
    }

    #[test]
    fn the_monitor_is_the_agents_socket_unless_only_an_older_qemus_is_there() {
        let root = tempfile::tempdir().unwrap();
        let p = VmPaths::new(&root.path().join("d"), &root.path().join("r"), "x");
        assert_eq!(p.monitor(), p.qmp, "neither: the agent's");
        std::fs::create_dir_all(&p.run_dir).unwrap();
        std::fs::write(&p.legacy_qmp, "").unwrap();
        assert_eq!(p.monitor(), p.legacy_qmp);
        std::fs::create_dir_all(p.qmp.parent().unwrap()).unwrap();
        std::fs::write(&p.qmp, "").unwrap();
        assert_eq!(p.monitor(), p.qmp);
        p.remove_all().unwrap();
        assert!(!p.qmp.exists() && !p.legacy_qmp.exists());
    }

    #[test]
    fn remove_all_is_idempotent_and_serial_tail_skips_blank_lines() {
        let root = tempfile::tempdir().unwrap();
        let p = VmPaths::new(&root.path().join("d"), &root.path().join("r"), "x");
        std::fs::create_dir_all(&p.dir).unwrap();
        std::fs::create_dir_all(&p.run_dir).unwrap();
        std::fs::write(&p.serial_log, "a\n\nb\nc\n").unwrap();
        assert_eq!(p.serial_tail(2), "b | c");
        let mut big = "x".repeat(100_000);
        big.push_str("\nlast\n");
        std::fs::write(&p.serial_log, big).unwrap();
        assert_eq!(p.serial_tail(1), "last");
        assert_eq!(read_tail(&p.serial_log, 6), "\nlast\n");
        p.remove_all().unwrap();
        assert!(!p.dir.exists() && !p.run_dir.exists());
        p.remove_all().unwrap();
        assert_eq!(p.serial_tail(2), "");
    }

    #[test]
    fn remove_known_leaves_foreign_files_and_their_directory() {
        let root = tempfile::tempdir().unwrap();
        let p = VmPaths::new(&root.path().join("d"), &root.path().join("r"), "x");
        std::fs::create_dir_all(&p.dir).unwrap();
        std::fs::create_dir_all(&p.run_dir).unwrap();
        for f in [&p.overlay, &p.seed, &p.pidfile, &p.legacy_qmp] {
            std::fs::write(f, "").unwrap();
        }
        let foreign = p.dir.join("notes.txt");
        std::fs::write(&foreign, "mine").unwrap();
        let removed = p.remove_known().unwrap();
        assert_eq!(removed.len(), 5, "{removed:?}"); // four files and the run dir
        assert!(foreign.exists() && !p.overlay.exists() && !p.run_dir.exists());
        assert_eq!(p.remove_known().unwrap(), Vec::<PathBuf>::new());
    }
}
