//! Read access to sysfs under an injectable root (default `/sys`).
//!
//! Paths follow the kernel's layout: `bus/pci/devices/<addr>` (links to the device
//! directories), `<dev>/driver` and `<dev>/iommu_group` (links), `kernel/iommu_groups/<n>/
//! devices/<addr>`, `module/<name>`. Writes (bind, unbind) live in [`super::write`].

use std::io;
use std::path::{Path, PathBuf};

use super::pci::PciAddress;

/// A sysfs read that failed.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// A directory could not be listed.
    #[error("cannot list {path}: {source}; check that sysfs is mounted and readable")]
    List { path: PathBuf, source: io::Error },
    /// An attribute does not hold the number it should.
    #[error("{path} holds {value:?}, not {expected}; the kernel's sysfs layout is not understood")]
    Parse { path: PathBuf, value: String, expected: &'static str },
    /// An attribute could not be read.
    #[error("cannot read {path}: {source}; check that sysfs is mounted and readable")]
    Read { path: PathBuf, source: io::Error },
    /// A link could not be read.
    #[error("cannot read the link {path}: {source}; check that sysfs is mounted and readable")]
    ReadLink { path: PathBuf, source: io::Error },
}

/// The root of a sysfs tree: `/sys` on a host, a temporary directory in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsRoot {
    root: PathBuf,
}

impl Default for SysfsRoot {
    fn default() -> Self {
        SysfsRoot::new("/sys")
    }
}

impl SysfsRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SysfsRoot { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<root>/<relative>`.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.root.join(relative)
    }

    /// The directory (through the `bus/pci/devices` link) of one PCI function.
    pub fn device_dir(&self, addr: &PciAddress) -> PathBuf {
        self.join("bus/pci/devices").join(addr.as_str())
    }

    /// One attribute file, trimmed.
    pub fn read_attr(&self, path: &Path) -> Result<String, SysfsError> {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| SysfsError::Read { path: path.to_owned(), source })
    }

    /// Every PCI function the kernel knows, sorted. Entries that are not addresses are skipped.
    pub fn pci_devices(&self) -> Result<Vec<PciAddress>, SysfsError> {
        let mut out: Vec<PciAddress> = list_names(&self.join("bus/pci/devices"))?
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn device_exists(&self, addr: &PciAddress) -> bool {
        self.device_dir(addr).is_dir()
    }

    pub fn vendor(&self, addr: &PciAddress) -> Result<u16, SysfsError> {
        let path = self.device_dir(addr).join("vendor");
        let v = self.read_hex(&path, "a 16-bit hex vendor id")?;
        u16::try_from(v).map_err(|_| parse_error(&path, &format!("{v:#x}"), "a 16-bit vendor id"))
    }

    pub fn device_id(&self, addr: &PciAddress) -> Result<u16, SysfsError> {
        let path = self.device_dir(addr).join("device");
        let v = self.read_hex(&path, "a 16-bit hex device id")?;
        u16::try_from(v).map_err(|_| parse_error(&path, &format!("{v:#x}"), "a 16-bit device id"))
    }

    /// The 24-bit class code (base class, subclass, programming interface).
    pub fn class(&self, addr: &PciAddress) -> Result<u32, SysfsError> {
        self.read_hex(&self.device_dir(addr).join("class"), "a hex class code")
    }

    /// The driver bound to the device (basename of its `driver` link); `None` when unbound.
    pub fn driver(&self, addr: &PciAddress) -> Result<Option<String>, SysfsError> {
        optional_link_name(&self.device_dir(addr).join("driver"))
    }

    /// The device's `driver_override`; `None` when unset (the kernel shows `(null)`).
    pub fn driver_override(&self, addr: &PciAddress) -> Result<Option<String>, SysfsError> {
        let path = self.device_dir(addr).join("driver_override");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let text = text.trim();
                Ok((!text.is_empty() && text != "(null)").then(|| text.to_owned()))
            }
            // Kernels before 3.16 have no override; nothing is set then.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// Sum of the device's 64-bit memory BARs (see [`super::resource`]); 0 without a
    /// `resource` file.
    pub fn bar64_bytes(&self, addr: &PciAddress) -> Result<u64, SysfsError> {
        let path = self.device_dir(addr).join("resource");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(super::resource::bar64_bytes(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// The IOMMU group of the device; `None` when the IOMMU is off.
    pub fn iommu_group(&self, addr: &PciAddress) -> Result<Option<u32>, SysfsError> {
        let path = self.device_dir(addr).join("iommu_group");
        match optional_link_name(&path)? {
            None => Ok(None),
            Some(name) => name
                .parse()
                .map(Some)
                .map_err(|_| parse_error(&path, &name, "a link to a numbered group")),
        }
    }

    /// Every device of an IOMMU group, sorted.
    pub fn iommu_group_devices(&self, group: u32) -> Result<Vec<PciAddress>, SysfsError> {
        let dir = self.join("kernel/iommu_groups").join(group.to_string()).join("devices");
        let mut out: Vec<PciAddress> =
            list_names(&dir)?.iter().filter_map(|n| n.parse().ok()).collect();
        out.sort();
        Ok(out)
    }

    /// The numbers of every IOMMU group, sorted; empty when the IOMMU is off.
    pub fn iommu_groups(&self) -> Result<Vec<u32>, SysfsError> {
        let dir = self.join("kernel/iommu_groups");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out: Vec<u32> = list_names(&dir)?.iter().filter_map(|n| n.parse().ok()).collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Whether the IOMMU is on: the kernel made at least one group.
    pub fn has_iommu_groups(&self) -> Result<bool, SysfsError> {
        Ok(!self.iommu_groups()?.is_empty())
    }

    /// Whether a kernel module is loaded (or built in with parameters): `module/<name>` exists.
    pub fn module_loaded(&self, name: &str) -> bool {
        self.join("module").join(name.replace('-', "_")).is_dir()
    }

    fn read_hex(&self, path: &Path, expected: &'static str) -> Result<u32, SysfsError> {
        let value = self.read_attr(path)?;
        let digits = value.strip_prefix("0x").unwrap_or(&value);
        u32::from_str_radix(digits, 16).map_err(|_| parse_error(path, &value, expected))
    }
}

fn parse_error(path: &Path, value: &str, expected: &'static str) -> SysfsError {
    SysfsError::Parse { path: path.to_owned(), value: value.to_owned(), expected }
}

fn list_names(dir: &Path) -> Result<Vec<String>, SysfsError> {
    let list_err = |source| SysfsError::List { path: dir.to_owned(), source };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        names.push(entry.map_err(list_err)?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// The last component of a link's target; `None` when the link does not exist.
fn optional_link_name(path: &Path) -> Result<Option<String>, SysfsError> {
    match std::fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SysfsError::ReadLink { path: path.to_owned(), source }),
    }
}
