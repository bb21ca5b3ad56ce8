//! Where the `/init/host` GPU facts come from (PROTOCOL.md §1): NVML when the host driver owns
//! the GPUs, else the self-test inventory file, else the PCI ids in sysfs. Every step that
//! cannot answer says why in one log line; nothing here fails registration.

use std::path::Path;

use super::GpuFacts;
use super::models;
use super::nvml::Nvml;
use super::pci::Inventory;
use super::selftest::SelfTestInventory;
use crate::vfio::{PciAddress, SysfsRoot};

/// The source that answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactsSource {
    Nvml,
    SelfTest,
    PciIds,
}

/// What the facts are read from.
pub struct FactsInputs<'a> {
    /// `None`: no driver on the host.
    pub nvml: Option<&'a Nvml>,
    /// `<data dir>/gpu-inventory.json`.
    pub selftest_file: &'a Path,
    pub sysfs: &'a SysfsRoot,
    /// `QUDATA_GPU_PCI_ADDRS`.
    pub only: Option<&'a [String]>,
}

/// The first source that knows at least one GPU; `None` when none does (a host without GPUs).
pub fn host_facts(inputs: &FactsInputs<'_>) -> Option<(GpuFacts, FactsSource)> {
    if let Some(nvml) = inputs.nvml {
        match nvml.facts() {
            Ok(mut facts) if facts.count > 0 => {
                // NVML lists every GPU the driver owns; only the selected ones are offered.
                if let Some(only) = inputs.only {
                    facts.count = facts.count.min(only.len() as u32);
                }
                return Some((facts, FactsSource::Nvml));
            }
            Ok(_) => tracing::debug!("NVML sees no GPU (they may be on vfio-pci)"),
            Err(e) => tracing::warn!(error = %e, "cannot read GPU facts from NVML"),
        }
    }
    match SelfTestInventory::read(inputs.selftest_file) {
        Ok(Some(inventory)) => {
            let facts = inventory.facts(inputs.only);
            if facts.count > 0 {
                return Some((facts, FactsSource::SelfTest));
            }
            tracing::warn!(file = %inputs.selftest_file.display(), "the GPU inventory lists none of the offered GPUs");
        }
        Ok(None) => {
            tracing::debug!(file = %inputs.selftest_file.display(), "no GPU inventory from a self-test")
        }
        Err(e) => tracing::warn!(error = %e, "ignoring the GPU inventory"),
    }
    from_pci(inputs).map(|facts| (facts, FactsSource::PciIds))
}

fn from_pci(inputs: &FactsInputs<'_>) -> Option<GpuFacts> {
    let only: Option<Vec<PciAddress>> =
        inputs.only.map(|list| list.iter().filter_map(|a| a.parse().ok()).collect());
    let inventory = match Inventory::scan(inputs.sysfs, only.as_deref()) {
        Ok(inventory) => inventory,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the PCI ids of the GPUs");
            return None;
        }
    };
    let first = inventory.gpus.first()?;
    let model = models::by_device(first.device);
    if model.is_none() {
        tracing::warn!(device = format!("{:04x}", first.device), address = %first.address, "GPU model not in the PCI id table: name and VRAM unknown");
    }
    Some(GpuFacts {
        name: model.map(|m| m.name.to_owned()).unwrap_or_default(),
        count: inventory.gpus.len() as u32,
        vram_gib: model.map(|m| m.vram_gib).unwrap_or(0.0),
        max_cuda: 0.0,
    })
}
