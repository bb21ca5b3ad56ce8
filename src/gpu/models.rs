//! The last resort for `/init/host` GPU facts: PCI device id → marketing name and nominal
//! memory, for the data-centre and workstation GPUs the marketplace sees. Used only when
//! neither NVML nor the self-test inventory answers (GPUs on vfio-pci, no self-test yet).

/// One known model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    pub device: u16,
    /// As NVML names it.
    pub name: &'static str,
    /// Nominal memory, GiB (the marketing size; NVML reports a little less).
    pub vram_gib: f64,
}

const fn m(device: u16, name: &'static str, vram_gib: f64) -> Model {
    Model { device, name, vram_gib }
}

/// Sorted by device id.
const MODELS: &[Model] = &[
    m(0x1eb8, "Tesla T4", 16.0),
    m(0x20b0, "NVIDIA A100-SXM4-40GB", 40.0),
    m(0x20b2, "NVIDIA A100-SXM4-80GB", 80.0),
    m(0x20b5, "NVIDIA A100 80GB PCIe", 80.0),
    m(0x20f1, "NVIDIA A100-PCIE-40GB", 40.0),
    m(0x2204, "NVIDIA GeForce RTX 3090", 24.0),
    m(0x2236, "NVIDIA A10", 24.0),
    m(0x2330, "NVIDIA H100 80GB HBM3", 80.0),
    m(0x2331, "NVIDIA H100 PCIe", 80.0),
    m(0x2335, "NVIDIA H200", 141.0),
    m(0x2684, "NVIDIA GeForce RTX 4090", 24.0),
    m(0x26b5, "NVIDIA L40", 48.0),
    m(0x26b9, "NVIDIA L40S", 48.0),
    m(0x27b8, "NVIDIA L4", 24.0),
];

/// The model with this NVIDIA PCI device id, if known.
pub fn by_device(device: u16) -> Option<&'static Model> {
    MODELS.binary_search_by_key(&device, |m| m.device).ok().map(|i| &MODELS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_for_the_binary_search() {
        assert!(MODELS.windows(2).all(|w| w[0].device < w[1].device));
    }

    #[test]
    fn known_and_unknown_ids() {
        assert_eq!(by_device(0x2330).map(|m| m.name), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(by_device(0x1eb8).map(|m| m.vram_gib), Some(16.0));
        assert_eq!(by_device(0x0001), None);
    }
}
