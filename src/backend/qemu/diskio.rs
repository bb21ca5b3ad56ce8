//! How QEMU does the overlay's I/O, probed on this host: O_DIRECT where the overlay's
//! filesystem allows it, io_uring where the kernel and this QEMU do.
//!
//! `cache=none` (O_DIRECT) keeps the guest's data out of the host's page cache, where it would
//! be cached twice (the guest has its own) and compete with the host for memory; with it, a
//! write is acknowledged once the host's disk has it, and `aio=io_uring` (else `native`)
//! submits it without a thread per request. `discard=unmap` passes the guest's TRIM down, so a
//! deleted file gives the overlay's blocks back to the host. Measured with
//! `cargo bench --bench memdisk` (CI guest under TCG, 2 busy cores, ext4 on a virtual disk,
//! 13 GiB of free page cache; busybox dd with O_DIRECT in the guest, medians of 3): the new
//! path wrote 427 MiB/s against 466 with QEMU's defaults, read 674 against 1 422 MiB/s (the
//! old path's reads come from the host's page cache), 4 KiB writes 4 082/s against 3 704/s;
//! an earlier run gave 371/656 MiB/s and 2 899/s against 502/1 067 MiB/s and 4 167/s. So on
//! a host with memory to spare the host's cache is faster: the choice is for production,
//! where VMs' memory is in huge pages and the host's cache would be a second copy competing
//! with the host for what is left, and where a guest's flush must reach the disk.
//! Where O_DIRECT fails (some filesystems, e.g. tmpfs before Linux 6.6) the overlay gets the
//! host's cache (`cache=writeback`) and `aio=threads`, the only mode that works without it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// How QEMU submits the overlay's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    IoUring,
    Native,
    Threads,
}

impl Aio {
    pub fn as_str(self) -> &'static str {
        match self {
            Aio::IoUring => "io_uring",
            Aio::Native => "native",
            Aio::Threads => "threads",
        }
    }
}

/// The overlay's I/O path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskIo {
    /// O_DIRECT: bypasses the host's page cache.
    pub direct: bool,
    pub aio: Aio,
}

impl DiskIo {
    /// What works on any filesystem and any QEMU: the host's cache, a thread pool.
    pub const CACHED: DiskIo = DiskIo { direct: false, aio: Aio::Threads };

    /// The `-drive` options.
    pub fn drive_options(&self) -> String {
        let cache = if self.direct { "none" } else { "writeback" };
        format!("cache={cache},aio={},discard=unmap", self.aio.as_str())
    }
}

/// The overlay's I/O path on this host: the overlay's dir is probed each time (VMs' dirs may
/// sit on different filesystems), io_uring once per process.
pub async fn probe(qemu: &Path, overlay_dir: &Path) -> DiskIo {
    if !direct_io_works(overlay_dir) {
        return DiskIo::CACHED;
    }
    let aio = if io_uring_works(qemu, overlay_dir).await { Aio::IoUring } else { Aio::Native };
    DiskIo { direct: true, aio }
}

/// Whether a file in `dir` can be opened with O_DIRECT and written through it (some
/// filesystems accept the open and fail the write).
pub fn direct_io_works(dir: &Path) -> bool {
    let Ok(probe) = ProbeFile::create(dir, "odirect") else { return false };
    let opened =
        std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(probe.path());
    let Ok(mut file) = opened else { return false };
    // O_DIRECT wants a buffer aligned to the logical block size: 4096 covers every disk.
    let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("a valid layout");
    // SAFETY: the layout has a non-zero size; the buffer is zeroed, used as a slice of exactly
    // that size, and freed with the same layout below.
    let written = unsafe {
        let buf = std::alloc::alloc_zeroed(layout);
        if buf.is_null() {
            return false;
        }
        let result = file.write_all(std::slice::from_raw_parts(buf, 4096));
        std::alloc::dealloc(buf, layout);
        result
    };
    written.is_ok()
}

/// An empty file of the agent's, removed when dropped.
struct ProbeFile(std::path::PathBuf);

impl ProbeFile {
    fn create(dir: &Path, what: &str) -> std::io::Result<ProbeFile> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(".qudata-{what}-probe-{}-{n}", std::process::id()));
        std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok(ProbeFile(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Time for the probe QEMU to start and quit.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Whether QEMU's unprivileged user may use io_uring (the `io_uring_disabled` sysctl says
/// 0) and this QEMU opens a file with `aio=io_uring` (it was built with liburing and the
/// kernel set a ring up). Asked once per process.
pub async fn io_uring_works(qemu: &Path, scratch: &Path) -> bool {
    static WORKS: tokio::sync::OnceCell<bool> = tokio::sync::OnceCell::const_new();
    *WORKS
        .get_or_init(|| async {
            let allowed = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map_or(true, |v| v.trim() == "0");
            let works = allowed && qemu_opens_with_io_uring(qemu, scratch).await;
            tracing::info!(io_uring = works, "probed io_uring for VM disks");
            works
        })
        .await
}

async fn qemu_opens_with_io_uring(qemu: &Path, scratch: &Path) -> bool {
    let Ok(file) = ProbeFile::create(scratch, "uring") else { return false };
    let blockdev = format!(
        "driver=file,filename={},node-name=probe,aio=io_uring,read-only=on",
        file.path().display().to_string().replace(',', ",,")
    );
    let spawned = tokio::process::Command::new(qemu)
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"])
        .args(["-blockdev", &blockdev])
        .env_clear()
        .envs(crate::child_env::for_child())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = spawned else { return false };
    let quit = b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n";
    if let Some(mut stdin) = child.stdin.take() {
        // A QEMU that refused the option has exited: the write may fail, the exit tells.
        let _ = stdin.write_all(quit).await;
    }
    match tokio::time::timeout(PROBE_DEADLINE, child.wait()).await {
        Ok(status) => status.is_ok_and(|s| s.success()),
        Err(_) => {
            let _ = child.kill().await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options_per_path() {
        let fast = DiskIo { direct: true, aio: Aio::IoUring };
        assert_eq!(fast.drive_options(), "cache=none,aio=io_uring,discard=unmap");
        let native = DiskIo { direct: true, aio: Aio::Native };
        assert_eq!(native.drive_options(), "cache=none,aio=native,discard=unmap");
        assert_eq!(DiskIo::CACHED.drive_options(), "cache=writeback,aio=threads,discard=unmap");
    }

    #[test]
    fn direct_io_is_refused_where_the_dir_is_missing_and_works_on_this_disk() {
        assert!(!direct_io_works(Path::new("/nonexistent/qudata")));
        // The build dir sits on the machine's disk (ext4 here), which takes O_DIRECT.
        assert!(direct_io_works(Path::new(env!("CARGO_MANIFEST_DIR"))));
    }
}
