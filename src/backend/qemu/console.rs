//! Following a VM's serial console while it boots, so that a boot that cannot succeed is an
//! error within seconds, in the console's own words, instead of a wait for the SSH deadline.
//!
//! [`ConsoleScanner`] is pure: bytes in, a [`BootFailure`] out when a line shows one (the
//! firmware found nothing to boot, a kernel panic, an initramfs without its root). It strips
//! terminal escapes, keeps only a bounded partial line and the last few lines.
//! [`ConsoleFollower`] feeds it from the `serial.log` file QEMU writes, in bounded reads.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// A console line longer than this is cut (the rest of it is dropped).
const LINE_LIMIT: usize = 512;
/// Lines kept for error messages.
const RECENT_LINES: usize = 6;
/// Bytes read from the log per poll.
const READ_CHUNK: usize = 64 << 10;
/// A guest that writes faster than this between polls is skipped ahead (bounded work).
const MAX_BEHIND: u64 = 1 << 20;
const POLL: Duration = Duration::from_millis(200);

/// What kind of boot failure a console line shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// UEFI found no bootable option (or fell back to its shell).
    NothingToBoot,
    /// The guest kernel panicked.
    KernelPanic,
    /// The initramfs could not find or mount the root file system.
    NoRootFs,
}

impl FailureKind {
    /// One sentence: what happened and what to do.
    pub fn describe(self) -> &'static str {
        match self {
            FailureKind::NothingToBoot => {
                "the VM's firmware found nothing to boot on its disk; the base image must be a \
                 UEFI-bootable disk (GPT with an EFI system partition)"
            }
            FailureKind::KernelPanic => {
                "the guest kernel panicked while booting; check the base image's kernel and \
                 initramfs"
            }
            FailureKind::NoRootFs => {
                "the guest's initramfs cannot find or mount its root file system; check the \
                 base image (root= on its kernel command line, its disk drivers)"
            }
        }
    }
}

/// A boot that cannot succeed, with the console lines that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFailure {
    pub kind: FailureKind,
    pub lines: Vec<String>,
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; console: {}", self.kind.describe(), self.lines.join(" | "))
    }
}

/// The failure a single (clean) console line shows, if any.
pub fn classify(line: &str) -> Option<FailureKind> {
    let has = |needle: &str| line.contains(needle);
    if has("No bootable option or device was found")
        || (line.starts_with("BdsDxe: loading") && has("\"EFI Internal Shell\""))
        || line.trim_end() == "Shell>"
    {
        return Some(FailureKind::NothingToBoot);
    }
    if has("VFS: Unable to mount root fs")
        || has("Gave up waiting for root")
        || (has("ALERT!") && has("does not exist"))
        || has("You are in emergency mode")
    {
        return Some(FailureKind::NoRootFs);
    }
    if has("Kernel panic - not syncing") {
        return Some(FailureKind::KernelPanic);
    }
    None
}

/// Escape-sequence state carried across chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// Inside a CSI sequence (`ESC [` … final byte).
    Csi,
}

/// Turns console bytes into clean lines and recognises boot failures.
#[derive(Debug, Default)]
pub struct ConsoleScanner {
    partial: String,
    escape: Escape,
    recent: VecDeque<String>,
}

impl ConsoleScanner {
    /// Feeds bytes; returns the first failure a completed line shows.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<BootFailure> {
        let mut failure = None;
        for &b in bytes {
            match (self.escape, b) {
                (Escape::Start, b'[') => self.escape = Escape::Csi,
                (Escape::Start, _) => self.escape = Escape::None,
                (Escape::Csi, 0x40..=0x7e) => self.escape = Escape::None,
                (Escape::Csi, _) => {}
                (Escape::None, 0x1b) => self.escape = Escape::Start,
                (Escape::None, b'\n' | b'\r') => {
                    if let Some(found) = self.end_line() {
                        failure = failure.or(Some(found));
                    }
                }
                (Escape::None, b) if b == b'\t' || b >= 0x20 => {
                    if self.partial.len() < LINE_LIMIT {
                        // Lossy per byte: console text is ASCII in practice.
                        self.partial.push(if b.is_ascii() { b as char } else { '?' });
                    }
                }
                (Escape::None, _) => {}
            }
        }
        // A prompt is printed without a line end.
        if failure.is_none() && classify(&self.partial) == Some(FailureKind::NothingToBoot) {
            failure = self.end_line();
        }
        failure
    }

    fn end_line(&mut self) -> Option<BootFailure> {
        let line = std::mem::take(&mut self.partial);
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        if self.recent.len() == RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line.to_owned());
        let kind = classify(line)?;
        Some(BootFailure { kind, lines: self.recent_lines(4) })
    }

    /// The last `n` non-empty lines (the partial one included), oldest first.
    pub fn recent_lines(&self, n: usize) -> Vec<String> {
        let mut lines: Vec<String> = self.recent.iter().cloned().collect();
        if !self.partial.trim().is_empty() {
            lines.push(self.partial.trim().to_owned());
        }
        let skip = lines.len().saturating_sub(n);
        lines.split_off(skip)
    }
}

/// The first boot failure a piece of console text shows (for a log read after the fact).
pub fn failure_in(text: &[u8]) -> Option<BootFailure> {
    let mut scanner = ConsoleScanner::default();
    scanner.feed(text).or_else(|| scanner.feed(b"\n"))
}

/// Follows `serial.log` from an offset (where the current boot's output starts).
pub struct ConsoleFollower {
    path: PathBuf,
    state: Mutex<(u64, ConsoleScanner)>,
}

impl ConsoleFollower {
    pub fn new(path: &Path, offset: u64) -> ConsoleFollower {
        ConsoleFollower {
            path: path.to_owned(),
            state: Mutex::new((offset, ConsoleScanner::default())),
        }
    }

    /// Resolves with the first boot failure the console shows; pending forever otherwise.
    pub async fn failure(&self) -> BootFailure {
        loop {
            if let Some(failure) = self.poll() {
                return failure;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads what was written since the last poll (bounded) and scans it.
    pub fn poll(&self) -> Option<BootFailure> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (offset, scanner) = &mut *state;
        let chunk = read_from(&self.path, offset)?;
        scanner.feed(&chunk)
    }

    /// The console's last lines, for an error message ("" when it stayed empty).
    pub fn last_lines(&self, n: usize) -> String {
        let _ = self.poll();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1.recent_lines(n).join(" | ")
    }
}

/// Up to [`READ_CHUNK`] bytes of `path` from `*offset`, advancing it. A file that shrank
/// (QEMU truncates it when it starts) is read from its start; one far ahead is skipped to
/// its last chunk.
fn read_from(path: &Path, offset: &mut u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a link: QEMU's user writes this file.
    let open = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut file = open.ok()?;
    let len = file.metadata().ok()?.len();
    if len < *offset {
        *offset = 0;
    }
    if len - *offset > MAX_BEHIND {
        *offset = len - READ_CHUNK as u64;
    }
    file.seek(SeekFrom::Start(*offset)).ok()?;
    let mut chunk = Vec::with_capacity(READ_CHUNK.min((len - *offset) as usize));
    file.take(READ_CHUNK as u64).read_to_end(&mut chunk).ok()?;
    *offset += chunk.len() as u64;
    Some(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's OVMF printed on this kind of machine for a disk of zeros beside the seed.
    const OVMF_NOTHING_TO_BOOT: &[u8] = b"\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: \
failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\n\
BdsDxe: failed to load Boot0002 \"UEFI Non-Block Boot Device\" from PciRoot(0x0)/Pci(0x2,0x0): \
Not Found\r\nBdsDxe: loading Boot0003 \"EFI Internal Shell\" from Fv(7CB8BDC9-F8EB-4F34-AAEA-\
3EE4AF6516A1)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1)\r\n";

    #[test]
    fn firmware_falling_back_to_its_shell_is_nothing_to_boot() {
        let mut s = ConsoleScanner::default();
        let failure = s.feed(OVMF_NOTHING_TO_BOOT).expect("a failure");
        assert_eq!(failure.kind, FailureKind::NothingToBoot);
        assert_eq!(failure.lines.len(), 3);
        assert!(failure.lines[0].starts_with("BdsDxe: failed to load Boot0001 \"UEFI Misc"));
        assert!(failure.lines[2].starts_with("BdsDxe: loading Boot0003 \"EFI Internal Shell\""));
        assert!(failure.to_string().starts_with("the VM's firmware found nothing to boot"));
    }

    #[test]
    fn a_shell_prompt_without_a_line_end_is_seen() {
        let mut s = ConsoleScanner::default();
        assert_eq!(s.feed(b"UEFI Interactive Shell v2.2\r\n"), None);
        let failure = s.feed(b"\x1b[0m\x1b[37;40mShell> ").expect("the prompt");
        assert_eq!(failure.kind, FailureKind::NothingToBoot);
        assert_eq!(failure.lines, ["UEFI Interactive Shell v2.2", "Shell>"]);
    }

    #[test]
    fn kernel_panics_and_missing_roots_are_named() {
        let mut s = ConsoleScanner::default();
        let panic = s
            .feed(
                b"[    1.2] Run /init as init process\n[    1.3] Kernel panic - not syncing: \
Attempted to kill init! exitcode=0x00000100\n",
            )
            .unwrap();
        assert_eq!(panic.kind, FailureKind::KernelPanic);
        assert_eq!(
            panic.lines.last().unwrap(),
            "[    1.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
        );
        let root = ConsoleScanner::default()
            .feed(b"Gave up waiting for root file system device.  Common problems:\n")
            .unwrap();
        assert_eq!(root.kind, FailureKind::NoRootFs);
        let vfs =
            b"Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n";
        assert_eq!(ConsoleScanner::default().feed(vfs).unwrap().kind, FailureKind::NoRootFs);
        let alert = b"ALERT!  UUID=1234 does not exist.  Dropping to a shell!\n";
        assert_eq!(ConsoleScanner::default().feed(alert).unwrap().kind, FailureKind::NoRootFs);
    }

    #[test]
    fn ordinary_boot_output_is_progress_and_escapes_split_across_chunks_are_stripped() {
        let mut s = ConsoleScanner::default();
        assert_eq!(s.feed(b"BdsDxe: loading Boot0001 \"UEFI Misc Device\"\r\n\x1b["), None);
        assert_eq!(s.feed(b"01;01HEFI stub: Loaded initrd\r\nci-guest: up"), None);
        assert_eq!(s.recent_lines(2), ["EFI stub: Loaded initrd", "ci-guest: up"]);
    }

    #[test]
    fn lines_and_memory_are_bounded() {
        let mut s = ConsoleScanner::default();
        let long = vec![b'x'; 100_000];
        assert_eq!(s.feed(&long), None);
        assert_eq!(s.recent_lines(1)[0].len(), LINE_LIMIT);
        for i in 0..100 {
            s.feed(format!("line {i}\n").as_bytes());
        }
        assert_eq!(s.recent.len(), RECENT_LINES);
        assert_eq!(s.recent_lines(2), ["line 98", "line 99"]);
    }

    #[test]
    fn the_follower_reads_from_its_offset_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, "Kernel panic - not syncing: old boot\nnew boot\n").unwrap();
        let offset = "Kernel panic - not syncing: old boot\n".len() as u64;
        let follower = ConsoleFollower::new(&log, offset);
        assert_eq!(follower.poll(), None, "the old boot's panic is not this boot's");
        assert_eq!(follower.last_lines(3), "new boot");
        let mut big = vec![b'.'; 3 << 20];
        big.extend_from_slice(b"\nKernel panic - not syncing: now\n");
        std::fs::write(&log, &big).unwrap(); // truncated and rewritten, longer
        let failure = follower.poll().expect("the panic at the end, after skipping ahead");
        assert_eq!(failure.kind, FailureKind::KernelPanic);
        let missing = ConsoleFollower::new(&dir.path().join("none.log"), 0);
        assert_eq!((missing.poll(), missing.last_lines(3)), (None, String::new()));
    }
}
