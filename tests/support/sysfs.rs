//! A fake sysfs tree in a temporary directory, laid out the way Linux lays out `/sys`:
//! device directories under `devices/pci<domain>:<bus>/`, `bus/pci/devices/<addr>` links to
//! them, `driver` links into `bus/pci/drivers/<name>`, `iommu_group` links into
//! `kernel/iommu_groups/<n>` whose `devices/` link back, and `module/<name>` directories.
//!
//! Built step by step: each `gpu`/`function`/`device` call adds a PCI function, and `driver`,
//! `group` and `bar` apply to the function added last. The write-side files exist as on Linux
//! (`driver_override` reading `(null)`, `bus/pci/drivers_probe`, each driver's `bind` and
//! `unbind`); [`super::kernel::SimKernel`] reacts to writes into them.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use qudata_agent::vfio::SysfsRoot;

pub const NVIDIA: u16 = 0x10de;
pub const CLASS_VGA: u32 = 0x030000;
pub const CLASS_3D: u32 = 0x030200;
pub const CLASS_AUDIO: u32 = 0x040300;
pub const CLASS_USB: u32 = 0x0c0330;
pub const CLASS_BRIDGE: u32 = 0x060400;
pub const CLASS_ETHERNET: u32 = 0x020000;

pub struct FakeSysfs {
    dir: tempfile::TempDir,
    last: Option<String>,
}

impl Default for FakeSysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeSysfs {
    /// An empty tree: no PCI devices, no IOMMU groups (the directory exists, as on a host
    /// booted without IOMMU), no modules.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("qudata-sysfs-").tempdir().expect("tempdir");
        for sub in ["bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "module"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        fs::write(dir.path().join("bus/pci/drivers_probe"), "").unwrap();
        FakeSysfs { dir, last: None }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> SysfsRoot {
        SysfsRoot::new(self.dir.path())
    }

    /// An NVIDIA GPU (function 0 of its slot, VGA class).
    pub fn gpu(self, addr: &str, device: u16) -> Self {
        self.device(addr, NVIDIA, device, CLASS_VGA)
    }

    /// Another NVIDIA function, e.g. the HDMI audio function of a GPU's slot.
    pub fn function(self, addr: &str, class: u32) -> Self {
        self.device(addr, NVIDIA, 0x22bc, class)
    }

    /// Any PCI function.
    pub fn device(mut self, addr: &str, vendor: u16, device: u16, class: u32) -> Self {
        let bus = &addr[..7];
        let real = self.path().join(format!("devices/pci{bus}/{addr}"));
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        fs::write(real.join("device"), format!("0x{device:04x}\n")).unwrap();
        fs::write(real.join("class"), format!("0x{class:06x}\n")).unwrap();
        fs::write(real.join("driver_override"), "(null)\n").unwrap();
        fs::write(real.join("resource"), resource_text(&[])).unwrap();
        fs::write(real.join("config"), config_space(vendor, device)).unwrap();
        let link = self.path().join("bus/pci/devices").join(addr);
        symlink(format!("../../../devices/pci{bus}/{addr}"), link).unwrap();
        self.last = Some(addr.to_owned());
        self
    }

    /// A loaded driver (its directory with `bind` and `unbind`), e.g. `vfio-pci`.
    pub fn driver_available(self, driver: &str) -> Self {
        let driver_dir = self.path().join("bus/pci/drivers").join(driver);
        fs::create_dir_all(&driver_dir).unwrap();
        for file in ["bind", "unbind"] {
            if !driver_dir.join(file).exists() {
                fs::write(driver_dir.join(file), "").unwrap();
            }
        }
        self
    }

    /// Gives the function added last these memory BARs: `(index, bytes, 64-bit)`.
    pub fn bars(self, bars: &[(usize, u64, bool)]) -> Self {
        let addr = self.last();
        fs::write(self.real_dir(&addr).join("resource"), resource_text(bars)).unwrap();
        self
    }

    /// Binds the function added last to `driver`.
    pub fn driver(self, driver: &str) -> Self {
        let addr = self.last();
        let this = self.driver_available(driver);
        let driver_dir = this.path().join("bus/pci/drivers").join(driver);
        symlink(format!("../../../bus/pci/drivers/{driver}"), this.real_dir(&addr).join("driver"))
            .unwrap();
        symlink(format!("../../../../devices/pci{}/{addr}", &addr[..7]), driver_dir.join(&addr))
            .unwrap();
        this
    }

    /// Puts the function added last into IOMMU group `group` (created on first use).
    pub fn group(self, group: u32) -> Self {
        let addr = self.last();
        let devices = self.path().join(format!("kernel/iommu_groups/{group}/devices"));
        fs::create_dir_all(&devices).unwrap();
        symlink(format!("../../../../devices/pci{}/{addr}", &addr[..7]), devices.join(&addr))
            .unwrap();
        symlink(
            format!("../../../kernel/iommu_groups/{group}"),
            self.real_dir(&addr).join("iommu_group"),
        )
        .unwrap();
        self
    }

    /// Gives the function added last a `reset` attribute and the methods `reset_method`
    /// lists (e.g. `"flr bus"`), as the kernel does for a device it can reset.
    pub fn resettable(self, methods: &str) -> Self {
        let dir = self.real_dir(&self.last());
        fs::write(dir.join("reset_method"), format!("{methods}\n")).unwrap();
        fs::write(dir.join("reset"), "").unwrap();
        self
    }

    /// The device's config space now reads all ones, as one that fell off the bus.
    pub fn off_the_bus(&self, addr: &str) {
        fs::write(self.real_dir(addr).join("config"), [0xffu8; 64]).unwrap();
    }

    /// The device disappears from sysfs (surprise removal).
    pub fn vanish(&self, addr: &str) {
        let _ = fs::remove_file(self.path().join("bus/pci/devices").join(addr));
        fs::remove_dir_all(self.real_dir(addr)).unwrap();
    }

    /// A loaded kernel module.
    pub fn module(self, name: &str) -> Self {
        fs::create_dir_all(self.path().join("module").join(name)).unwrap();
        self
    }

    /// The driver the device is bound to now (basename of its `driver` link).
    pub fn driver_of(&self, addr: &str) -> Option<String> {
        let link = fs::read_link(self.real_dir(addr).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    /// The device's `driver_override`, trimmed (`(null)` when unset).
    pub fn override_of(&self, addr: &str) -> String {
        let text = fs::read_to_string(self.real_dir(addr).join("driver_override")).unwrap();
        let text = text.trim();
        if text.is_empty() { "(null)".to_owned() } else { text.to_owned() }
    }

    fn last(&self) -> String {
        self.last.clone().expect("add a device first")
    }

    pub fn real_dir(&self, addr: &str) -> PathBuf {
        self.path().join(format!("devices/pci{}/{addr}", &addr[..7]))
    }
}

/// The start of a config space: vendor and device id, little-endian, then zeros.
pub fn config_space(vendor: u16, device: u16) -> Vec<u8> {
    let mut bytes = vec![0u8; 64];
    bytes[..2].copy_from_slice(&vendor.to_le_bytes());
    bytes[2..4].copy_from_slice(&device.to_le_bytes());
    bytes
}

/// A `resource` file as the kernel writes it: 13 lines of `start end flags`; BARs get
/// addresses one after the other from 0x2000_0000_0000.
pub fn resource_text(bars: &[(usize, u64, bool)]) -> String {
    let mut lines = vec![(0u64, 0u64, 0u64); 13];
    let mut next = 0x2000_0000_0000u64;
    for &(index, bytes, is_64) in bars {
        // IORESOURCE_MEM | PREFETCH (| MEM_64): the flags the kernel shows for GPU BARs.
        let flags = 0x0004_2200 | if is_64 { 0x0010_0000 } else { 0 };
        lines[index] = (next, next + bytes - 1, flags);
        next += bytes.next_power_of_two();
    }
    lines.iter().map(|(s, e, f)| format!("0x{s:016x} 0x{e:016x} 0x{f:016x}\n")).collect()
}
