//! Writes to sysfs attributes, each with a deadline.
//!
//! A write to `unbind` or `drivers_probe` runs driver code in the kernel and can block for
//! ever on bad hardware. The write runs on a thread of its own; past the deadline the caller
//! gets an error and the thread is left behind (a task stuck in the kernel cannot be
//! cancelled; it ends if the write ever returns).

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::error::VfioError;

/// Writes `value` to the attribute at `path` (which must exist: sysfs files are never
/// created), waiting at most `timeout`.
pub fn write_attr(path: &Path, value: &str, timeout: Duration) -> Result<(), VfioError> {
    let (tx, rx) = mpsc::channel();
    let (owned_path, owned_value) = (path.to_owned(), value.to_owned());
    let spawned = std::thread::Builder::new().name("sysfs-write".into()).spawn(move || {
        // One write(2) call, as `echo value > attr` does: sysfs reads a store in one piece.
        let result = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&owned_path)
            .and_then(|mut f| f.write_all(owned_value.as_bytes()));
        let _ = tx.send(result);
    });
    let fail = |source| VfioError::Write { path: path.to_owned(), value: value.to_owned(), source };
    spawned.map_err(fail)?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(fail),
        Err(_) => Err(VfioError::WriteTimeout {
            path: path.to_owned(),
            value: value.to_owned(),
            millis: timeout.as_millis(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_the_value_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let attr = dir.path().join("driver_override");
        std::fs::write(&attr, "(null)\n").unwrap();
        write_attr(&attr, "vfio-pci", Duration::from_secs(5)).unwrap();
        assert_eq!(std::fs::read_to_string(&attr).unwrap(), "vfio-pci");
        let err = write_attr(&dir.path().join("nope"), "x", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, VfioError::Write { .. }), "{err}");
    }

    #[test]
    fn a_write_that_blocks_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("unbind");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a FIFO with no reader blocks, like a write into a hung driver.
        let err = write_attr(&fifo, "0000:65:00.0", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, VfioError::WriteTimeout { .. }), "{err}");
        // Let the stuck thread finish: a reader unblocks its open.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
    }

    use std::os::unix::fs::OpenOptionsExt;
}
