//! BAR sizes from a device's sysfs `resource` file.
//!
//! One line per resource, `start end flags` in hex (`0x%016llx`); lines 0-5 are the BARs, line
//! 6 the expansion ROM, the rest bridge windows. An unused BAR (or the upper half of a 64-bit
//! one) reads as all zeros.

/// `IORESOURCE_MEM` of `include/linux/ioport.h`: a memory (not I/O port) resource.
const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_MEM_64`: the BAR decodes 64-bit addresses.
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// BARs are lines 0-5; the ROM (line 6) is mapped below 4 GiB and is not counted.
const BAR_LINES: usize = 6;

/// One memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub bytes: u64,
    pub is_64bit: bool,
}

/// The memory BARs of a `resource` file. Lines that do not parse are skipped: the file is the
/// kernel's, and an odd line must not stop a VM from starting (its BAR then gets no room in
/// the window, which OVMF reports in the guest).
pub fn memory_bars(resource: &str) -> Vec<Bar> {
    let mut bars = Vec::new();
    for (index, line) in resource.lines().take(BAR_LINES).enumerate() {
        let mut fields = line.split_whitespace().map(parse_hex);
        let (Some(Some(start)), Some(Some(end)), Some(Some(flags))) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if flags & IORESOURCE_MEM == 0 || end <= start {
            continue;
        }
        let bytes = end - start + 1;
        bars.push(Bar { index, bytes, is_64bit: flags & IORESOURCE_MEM_64 != 0 });
    }
    bars
}

/// Sum of the 64-bit memory BARs: what must fit in the guest's 64-bit MMIO window.
pub fn bar64_bytes(resource: &str) -> u64 {
    memory_bars(resource)
        .iter()
        .filter(|b| b.is_64bit)
        .fold(0u64, |acc, b| acc.saturating_add(b.bytes))
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An H100 PCIe as the kernel shows it: 16 MiB 32-bit BAR0, 128 GiB BAR1 and 32 MiB BAR3
    /// (both 64-bit prefetchable), the ROM, bridge windows unused.
    const H100: &str = "\
0x00000000e2000000 0x00000000e2ffffff 0x0000000000040200
0x0000202000000000 0x0000203fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000204000000000 0x0000204001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000e3000000 0x00000000e307ffff 0x0000000000046200
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    #[test]
    fn sums_the_64_bit_memory_bars_only() {
        let bars = memory_bars(H100);
        assert_eq!(bars.len(), 3, "{bars:?}");
        assert_eq!(bars[0], Bar { index: 0, bytes: 16 << 20, is_64bit: false });
        assert_eq!(bars[1], Bar { index: 1, bytes: 128 << 30, is_64bit: true });
        assert_eq!(bar64_bytes(H100), (128 << 30) + (32 << 20));
    }

    #[test]
    fn io_ports_empty_and_garbled_lines_count_nothing() {
        let text = "0x000000000000e000 0x000000000000e07f 0x0000000000040101\nnonsense\n\n";
        assert!(memory_bars(text).is_empty());
        assert_eq!(bar64_bytes(""), 0);
    }
}
