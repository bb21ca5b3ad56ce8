//! PCI addresses (`DDDD:BB:DD.F`) and the class codes the agent cares about.

use std::fmt;
use std::str::FromStr;

use crate::config::parse_pci_address;

/// PCI vendor id of NVIDIA.
pub const VENDOR_NVIDIA: u16 = 0x10de;
/// Base class + subclass (the upper 16 bits of the 24-bit class) of a VGA controller.
pub const CLASS_VGA: u16 = 0x0300;
/// Base class + subclass of a 3D controller (data-centre GPUs without a display).
pub const CLASS_3D: u16 = 0x0302;
/// Base class + subclass of an HD audio controller (a GPU's HDMI audio function).
pub const CLASS_AUDIO: u16 = 0x0403;
/// Base class of bridges (never bound to vfio-pci).
pub const CLASS_BASE_BRIDGE: u8 = 0x06;

/// A PCI function address, normalised to lowercase `DDDD:BB:DD.F`.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct PciAddress(String);

/// Not a `DDDD:BB:DD.F` address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a PCI address; use the form 0000:65:00.0")]
pub struct BadPciAddress {
    pub value: String,
}

impl PciAddress {
    /// `DDDD:BB:DD` (domain, bus, device): every function of one card shares it.
    pub fn slot(&self) -> &str {
        &self.0[..10]
    }

    /// The function number (0-7).
    pub fn function(&self) -> u8 {
        self.0.as_bytes()[11] - b'0'
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PciAddress {
    type Err = BadPciAddress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_pci_address(s).map(PciAddress).map_err(|_| BadPciAddress { value: s.to_owned() })
    }
}

impl TryFrom<String> for PciAddress {
    type Error = BadPciAddress;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PciAddress> for String {
    fn from(a: PciAddress) -> String {
        a.0
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_an_address() {
        let a: PciAddress = "0000:B3:00.1".parse().unwrap();
        assert_eq!(a.as_str(), "0000:b3:00.1");
        assert_eq!(a.slot(), "0000:b3:00");
        assert_eq!(a.function(), 1);
    }

    #[test]
    fn refuses_a_short_address() {
        let err = "65:00.0".parse::<PciAddress>().unwrap_err();
        assert_eq!(err.value, "65:00.0");
    }
}
