//! QEMU runs as an unprivileged system user (`QUDATA_QEMU_USER`, made by `install.sh`, or
//! here when missing), as libvirt runs it: the agent drops to that user between fork and exec,
//! so QEMU never holds root and its seccomp filter can deny every `set*uid` call (with
//! `-run-with user=` QEMU would need them itself to drop root, which that filter forbids).
//!
//! The user owns only its VM's files (disk overlay, firmware variables, seed, the run dir with
//! the monitor socket) and `/dev/vfio/<group>` of its GPUs' groups while they are passed
//! through; the directories above are traverse-only (0711) for it. It is in the group of
//! `/dev/kvm`.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why QEMU's user cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{name:?} is not a user name QEMU can run as (letters, digits, '_' and '-')")]
    BadName { name: String },
    #[error("cannot create the system user {name} for QEMU: {detail}")]
    Create { name: String, detail: String },
    #[error("the user {name} does not exist and could not be made")]
    Missing { name: String },
    #[error("cannot give {path} to QEMU's user: {source}")]
    Chown { path: PathBuf, source: std::io::Error },
}

/// The user QEMU runs as, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the group of `/dev/kvm`.
    pub groups: Vec<u32>,
}

/// The groups QEMU needs besides its own: the group of `/dev/kvm`. A `/dev/kvm` that only root
/// may open (a host without udev's rule) is given to the `kvm` group, mode 0660, as Debian's
/// udev rule does.
fn device_groups() -> Vec<u32> {
    let kvm = Path::new("/dev/kvm");
    let Ok(meta) = std::fs::metadata(kvm) else { return Vec::new() };
    if meta.gid() != 0 {
        return vec![meta.gid()];
    }
    let gid = group_gid("kvm").or_else(|| {
        let made = Command::new("groupadd").args(["--system", "kvm"]).output();
        if let Err(e) = made {
            tracing::warn!(error = %e, "cannot make the kvm group");
        }
        group_gid("kvm")
    });
    let Some(gid) = gid else { return Vec::new() };
    let given = std::os::unix::fs::chown(kvm, None, Some(gid))
        .and_then(|()| std::fs::set_permissions(kvm, std::fs::Permissions::from_mode(0o660)));
    match given {
        Ok(()) => {
            tracing::info!("/dev/kvm was root's only: now root:kvm 0660, as udev makes it");
            vec![gid]
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot give /dev/kvm to the kvm group: QEMU cannot use KVM");
            Vec::new()
        }
    }
}

/// The gid of group `name`.
fn group_gid(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getgrnam_r writes into the buffers we own and sizes; `result` is checked
    // before the struct is read.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc =
            libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut result);
        (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
}

impl QemuUser {
    /// The user `name`, made as a system user without a home or a login shell if missing.
    pub fn ensure(name: &str) -> Result<QemuUser, ConfineError> {
        if !valid_name(name) {
            return Err(ConfineError::BadName { name: name.to_owned() });
        }
        if crate::sysuser::lookup(name).is_none() {
            // The name is checked above, and travels as one argument: no shell.
            let out = Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
                .args(["--comment", "qudata-agent QEMU"])
                .arg(name)
                .output()
                .map_err(|e| ConfineError::Create {
                    name: name.to_owned(),
                    detail: e.to_string(),
                })?;
            // Another agent may have made it meanwhile (exit 9: it exists).
            if !out.status.success() && crate::sysuser::lookup(name).is_none() {
                let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                return Err(ConfineError::Create { name: name.to_owned(), detail });
            }
            tracing::info!(user = name, "made the system user QEMU runs as");
        }
        let (uid, gid) = crate::sysuser::lookup(name)
            .ok_or_else(|| ConfineError::Missing { name: name.into() })?;
        Ok(QemuUser { name: name.to_owned(), uid, gid, groups: device_groups() })
    }

    /// Gives `path` to the user (its VM's files and directories).
    pub fn own(&self, path: &Path) -> Result<(), ConfineError> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .map_err(|source| ConfineError::Chown { path: path.to_owned(), source })
    }

    /// Lets the user through `dir` (root's directory above its files) without reading it.
    pub fn traverse(&self, dir: &Path) -> Result<(), ConfineError> {
        let chmod = |source| ConfineError::Chown { path: dir.to_owned(), source };
        let mode = std::fs::metadata(dir).map_err(chmod)?.permissions().mode();
        if mode & 0o011 != 0o011 {
            let wanted = std::fs::Permissions::from_mode((mode & 0o7777) | 0o011);
            std::fs::set_permissions(dir, wanted).map_err(chmod)?;
        }
        Ok(())
    }

    /// Lets the user read a base image of the agent's (an overlay's backing file, opened
    /// read-only): its directories up to `root` traversable, the file readable by all. An
    /// image elsewhere is the operator's: it is left as it is.
    pub fn may_read_image(&self, image: &Path, root: &Path) -> Result<(), ConfineError> {
        let Ok(inside) = image.strip_prefix(root) else { return Ok(()) };
        let mut dir = root.to_owned();
        self.traverse(&dir)?;
        for part in inside.parent().into_iter().flat_map(Path::components) {
            dir.push(part);
            self.traverse(&dir)?;
        }
        let chmod = |source| ConfineError::Chown { path: image.to_owned(), source };
        // Through a link (local mode's base.qcow2) to the image itself.
        let mode = std::fs::metadata(image).map_err(chmod)?.permissions().mode();
        if mode & 0o004 == 0 {
            let wanted = std::fs::Permissions::from_mode((mode & 0o7777) | 0o044);
            std::fs::set_permissions(image, wanted).map_err(chmod)?;
        }
        Ok(())
    }

    /// Gives (`Some`) or takes back (`None`, to root) the VFIO group devices of a VM's GPUs.
    pub fn vfio_groups(
        user: Option<&QemuUser>,
        dev_vfio: &Path,
        groups: &[u32],
    ) -> Result<(), ConfineError> {
        for group in groups {
            let path = dev_vfio.join(group.to_string());
            let (uid, gid) = user.map_or((0, 0), |u| (u.uid, u.gid));
            match std::os::unix::fs::chown(&path, Some(uid), Some(gid)) {
                Ok(()) => {}
                // Gone with the last device of the group leaving vfio-pci: nothing to take back.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && user.is_none() => {}
                Err(source) => return Err(ConfineError::Chown { path, source }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_user_names() {
        for good in ["qudata-qemu", "_qemu", "qemu2"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "Qemu", "-x", "a b", "a;b", "root\n", &"x".repeat(33)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn root_is_found_in_the_user_database() {
        assert_eq!(crate::sysuser::lookup("root"), Some((0, 0)));
        assert_eq!(crate::sysuser::lookup("no-such-user-qudata"), None);
    }

    #[test]
    fn vfio_group_devices_are_given_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("42"), b"").unwrap();
        let user = QemuUser { name: "nobody".into(), uid: 65534, gid: 65534, groups: vec![] };
        QemuUser::vfio_groups(Some(&user), dir.path(), &[42]).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("42")).unwrap().uid(), 65534);
        QemuUser::vfio_groups(None, dir.path(), &[42, 43]).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("42")).unwrap().uid(), 0);
        let err = QemuUser::vfio_groups(Some(&user), dir.path(), &[43]).unwrap_err();
        assert!(err.to_string().contains("43"), "{err}");
    }

    #[test]
    fn an_image_of_the_agents_is_made_readable_and_one_elsewhere_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let private = std::fs::Permissions::from_mode(0o700);
        std::fs::set_permissions(root.path(), private.clone()).unwrap();
        std::fs::set_permissions(&images, private).unwrap();
        let image = images.join("ci-guest.qcow2");
        std::fs::write(&image, b"qcow").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("ci-guest.qcow2", images.join("base.qcow2")).unwrap();
        let user = QemuUser { name: "nobody".into(), uid: 65534, gid: 65534, groups: vec![] };
        user.may_read_image(&images.join("base.qcow2"), root.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(root.path()), 0o711);
        assert_eq!(mode(&images), 0o711);
        assert_eq!(mode(&image), 0o644);
        let elsewhere = tempfile::tempdir().unwrap();
        let theirs = elsewhere.path().join("x.qcow2");
        std::fs::write(&theirs, b"qcow").unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o600)).unwrap();
        user.may_read_image(&theirs, root.path()).unwrap();
        assert_eq!(mode(&theirs), 0o600, "not the agent's to change");
    }

    #[test]
    fn traverse_adds_only_the_search_bits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let user = QemuUser { name: "nobody".into(), uid: 65534, gid: 65534, groups: vec![] };
        user.traverse(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o711);
    }
}
