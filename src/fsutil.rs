//! Durable, private files: every state file is written whole or not at all, mode 0600.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not safe for the agent's state: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

/// Creates `dir` (and parents) with mode 0700 when missing.
pub fn ensure_private_dir(dir: &Path) -> Result<(), FsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| FsError::CreateDir { path: dir.to_owned(), source })
}

/// [`ensure_private_dir`] for a directory that holds the agent's state (records, keys,
/// secrets, VM disks): it must be a real directory owned by this user and writable by no one
/// else, or whoever could write there could plant links or replace records.
pub fn ensure_state_dir(dir: &Path) -> Result<(), FsError> {
    ensure_private_dir(dir)?;
    let meta = fs::symlink_metadata(dir)
        .map_err(|source| FsError::Read { path: dir.to_owned(), source })?;
    let unsafe_because = |reason: String| FsError::Unsafe { path: dir.to_owned(), reason };
    if !meta.file_type().is_dir() {
        return Err(unsafe_because("it is a link, not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_because(format!("it is owned by uid {}, not {me}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        let mode = meta.mode() & 0o7777;
        return Err(unsafe_because(format!(
            "its mode {mode:04o} lets others write in it (chmod go-w it)"
        )));
    }
    Ok(())
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right size; statvfs fills it completely on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Replaces `path` with `contents` atomically: temp file in the same directory, fsync, rename,
/// fsync of the directory. A crash leaves either the old or the new file, never a torn one;
/// a failure (disk full) leaves the old file untouched and no temp file behind.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), FsError> {
    let err = |source| FsError::Write { path: path.to_owned(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| err(io::ErrorKind::InvalidInput.into()))?;
    // A fresh name, created exclusively and never through a link: another writer (or a link
    // planted in the directory) cannot make this write land elsewhere.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp)?;
        // The mode above is filtered by the umask and ignored for an existing file.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Reads a file; `Ok(None)` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FsError::Read { path: path.to_owned(), source }),
    }
}

/// The last `bytes` of `path` as text (lossy), never through a link (files in directories
/// another user writes: QEMU's logs and serial console); empty when unreadable.
pub fn read_tail(path: &Path, bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let open = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let Ok(mut file) = open else { return String::new() };
    let len = file.metadata().map_or(0, |m| m.len());
    if file.seek(SeekFrom::Start(len.saturating_sub(bytes))).is_err() {
        return String::new();
    }
    let mut tail = Vec::new();
    let _ = file.take(bytes).read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_others_can_write_in_or_a_link_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let good = root.path().join("state");
        ensure_state_dir(&good).unwrap();
        ensure_state_dir(&good).unwrap(); // existing and fine
        fs::set_permissions(&good, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_state_dir(&good).unwrap_err().to_string();
        assert!(err.ends_with("its mode 0777 lets others write in it (chmod go-w it)"), "{err}");
        fs::set_permissions(&good, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_state_dir(&good).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let err = ensure_state_dir(&link).unwrap_err().to_string();
        assert!(err.contains("is a link"), "{err}");
    }

    #[test]
    fn writes_private_files_and_replaces_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"], "no temp file left behind");
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        // A directory in the way of the rename makes the write fail after the temp file.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let leftovers = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn missing_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_optional(&dir.path().join("nope")).unwrap().is_none());
    }

    #[test]
    fn private_dir_is_0700() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        ensure_private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
