//! GPU errors in the kernel log: NVIDIA's Xid reports (for GPUs on the host driver) and
//! vfio-pci's complaints about a device it holds. Records are read as `/dev/kmsg` gives them
//! (`<prio>,<seq>,<µs since boot>,<flags>;<text>`, continuation lines indented), so a fake log
//! in tests is a plain file of such lines.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::vfio::PciAddress;

/// One error the kernel logged about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuEvent {
    /// Kernel log time, µs since boot.
    pub micros: u64,
    /// Function 0 of the GPU's slot.
    pub gpu: PciAddress,
    /// One sentence for the quarantine.
    pub reason: String,
}

/// Xids that say the GPU itself is damaged or lost (NVIDIA's Xid catalogue), as opposed to a
/// program's fault (13, 31, 43, 45…), which a renter can cause at will and which says nothing
/// about the next tenant.
const FATAL_XIDS: &[(u32, &str)] = &[
    (48, "double-bit ECC error"),
    (61, "internal micro-controller breakpoint"),
    (62, "internal micro-controller halt"),
    (64, "ECC page retirement or row remapping failure"),
    (74, "NVLink error"),
    (79, "GPU has fallen off the bus"),
    (92, "high single-bit ECC error rate"),
    (95, "uncontained ECC error"),
    (119, "GSP RPC timeout"),
    (120, "GSP error"),
    (140, "unrecovered ECC error"),
];

/// What vfio-pci writes about a device that no longer behaves.
const VFIO_PCI_FAILURES: &[&str] = &[
    "not ready",
    "giving up",
    "Unable to change power state",
    "timed out",
    "AER: Uncorrectable",
    "fatal",
];

/// The GPU error in one log record, if it is one.
pub fn parse_record(record: &str) -> Option<GpuEvent> {
    let (header, text) = record.split_once(';')?;
    let micros = header.split(',').nth(2)?.parse().ok()?;
    parse_xid(text).or_else(|| parse_vfio_pci(text)).map(|(gpu, reason)| GpuEvent {
        micros,
        gpu,
        reason,
    })
}

/// One Xid report, whether it says the GPU is damaged or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xid {
    /// Function 0 of the GPU's slot.
    pub gpu: PciAddress,
    pub xid: u32,
    /// What a fatal Xid means; `None` for the others (a program's fault).
    pub fatal: Option<&'static str>,
}

/// The Xid in one log record, fatal or not.
pub fn xid_of_record(record: &str) -> Option<Xid> {
    xid_of(record.split_once(';')?.1)
}

/// `NVRM: Xid (PCI:0000:65:00): 79, pid=…, GPU has fallen off the bus.`
fn xid_of(text: &str) -> Option<Xid> {
    let rest = text.split_once("NVRM: Xid (PCI:")?.1;
    let (slot, rest) = rest.split_once("):")?;
    let xid: u32 = rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let gpu: PciAddress = format!("{slot}.0").parse().ok()?;
    let fatal = FATAL_XIDS.iter().find(|(n, _)| *n == xid).map(|(_, meaning)| *meaning);
    Some(Xid { gpu, xid, fatal })
}

fn parse_xid(text: &str) -> Option<(PciAddress, String)> {
    let Xid { gpu, xid, fatal } = xid_of(text)?;
    Some((gpu, format!("the kernel logged Xid {xid} ({})", fatal?)))
}

/// `vfio-pci 0000:65:00.0: not ready 65535ms after FLR; giving up`
fn parse_vfio_pci(text: &str) -> Option<(PciAddress, String)> {
    let rest = text.split_once("vfio-pci ")?.1;
    let (address, message) = rest.split_once(": ")?;
    let device: PciAddress = address.parse().ok()?;
    VFIO_PCI_FAILURES.iter().find(|f| message.contains(*f))?;
    let gpu: PciAddress = format!("{}.0", device.slot()).parse().ok()?;
    let message: String = message.chars().take(160).filter(|c| !c.is_control()).collect();
    Some((gpu, format!("vfio-pci reported {device}: {message}")))
}

/// Reads a kernel log from its start and then what is added, without blocking.
pub struct KmsgReader {
    file: std::fs::File,
    /// A partial line (a plain file read mid-write).
    pending: Vec<u8>,
}

/// The longest record the kernel writes (`/dev/kmsg` refuses a read into a smaller buffer).
const RECORD_MAX: usize = 8192;

impl KmsgReader {
    pub fn open(path: &Path) -> std::io::Result<KmsgReader> {
        let file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        Ok(KmsgReader { file, pending: Vec::new() })
    }

    /// Every complete record since the last call (continuation lines dropped).
    pub fn read_new(&mut self) -> Vec<String> {
        let mut buf = vec![0u8; RECORD_MAX];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                // Records overwritten before they were read: go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN: nothing more for now
            }
            if self.pending.len() > 16 * RECORD_MAX {
                break; // the rest on the next call: bounded memory
            }
        }
        let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') else { return Vec::new() };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_xids_are_events_program_faults_are_not() {
        let e = parse_record(
            "3,812,95012345,-;NVRM: Xid (PCI:0000:65:00): 79, pid=1234, name=python3, GPU has fallen off the bus.",
        )
        .unwrap();
        assert_eq!(e.micros, 95012345);
        assert_eq!(e.gpu.as_str(), "0000:65:00.0");
        assert_eq!(e.reason, "the kernel logged Xid 79 (GPU has fallen off the bus)");
        let program = "4,813,95012399,-;NVRM: Xid (PCI:0000:65:00): 13, pid=1, Graphics Exception";
        assert_eq!(parse_record(program), None);
        assert_eq!(parse_record("6,1,2,-;usb 1-1: new high-speed USB device"), None);
        assert_eq!(parse_record("garbage"), None);
        assert_eq!(parse_record("3,1,x,-;NVRM: Xid (PCI:0000:65:00): 79, y"), None);
    }

    #[test]
    fn every_xid_is_read_with_its_gpu_fatal_or_not() {
        let program =
            xid_of_record("4,813,1,-;NVRM: Xid (PCI:0000:B3:00): 13, pid=1, Graphics").unwrap();
        assert_eq!((program.gpu.as_str(), program.xid, program.fatal), ("0000:b3:00.0", 13, None));
        let lost = xid_of_record("3,1,2,-;NVRM: Xid (PCI:0000:65:00): 79, pid=1").unwrap();
        assert_eq!(lost.fatal, Some("GPU has fallen off the bus"));
        assert_eq!(xid_of_record("6,1,2,-;vfio-pci 0000:65:00.0: not ready; giving up"), None);
        assert_eq!(xid_of_record("NVRM: Xid (PCI:0000:65:00): 79"), None, "no header");
    }

    #[test]
    fn vfio_pci_failures_name_the_slot() {
        let e = parse_record(
            "3,900,1000,-;vfio-pci 0000:65:00.1: not ready 65535ms after FLR; giving up",
        )
        .unwrap();
        assert_eq!(e.gpu.as_str(), "0000:65:00.0");
        assert!(e.reason.contains("0000:65:00.1: not ready"), "{}", e.reason);
        assert_eq!(
            parse_record("6,901,1001,-;vfio-pci 0000:65:00.0: enabling device (0000 -> 0003)"),
            None
        );
    }

    #[test]
    fn the_reader_returns_whole_records_and_then_only_new_ones() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "6,1,10,-;first\n SUBSYSTEM=pci\n6,2,20,-;sec").unwrap();
        let mut reader = KmsgReader::open(&path).unwrap();
        assert_eq!(reader.read_new(), ["6,1,10,-;first"]);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"ond\n").unwrap();
        assert_eq!(reader.read_new(), ["6,2,20,-;second"]);
        assert!(reader.read_new().is_empty());
    }
}
