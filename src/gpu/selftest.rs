//! The GPU inventory `qudata-agent selftest` leaves behind, read for `/init/host` when the
//! GPUs sit on vfio-pci and the host cannot ask NVML.
//!
//! The self-test runs on the host while the GPUs are still on the NVIDIA driver (the installer
//! runs it before it moves them to vfio-pci): it asks NVML for each GPU's facts and memory
//! health, reads the kernel log since boot for Xids, and writes `<data dir>/gpu-inventory.json`
//! (atomically, 0600). Format, version 1:
//!
//! ```json
//! {
//!   "version": 1,
//!   "tested_at": "2026-11-23T12:00:00Z",
//!   "driver_version": "550.54.15",
//!   "cuda_version": "12.4",
//!   "gpus": [
//!     {"pci_address": "0000:65:00.0", "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559}
//!   ]
//! }
//! ```
//! - `version`: 1. Another number is refused (a newer agent wrote it: update the agent).
//! - `cuda_version`: the highest CUDA version the driver supports, `major.minor`; `""` only
//!   in an empty inventory (a host with no driver).
//! - `gpus`: one entry per GPU the driver owned, with its PCI address (function 0 of its slot).
//!
//! Optional per-GPU fields, added within version 1 (older files lack them, older agents
//! ignore them): `pcie` (`gen_current`, `gen_max`, `width_current`, `width_max`),
//! `ecc_enabled` (the current mode), `power_limit_w` (the enforced limit) and `health`:
//! `{"ok", "reasons", "memory": {"retired_pages_pending", "row_remap_pending",
//! "row_remap_failure"}, "xids": [{"xid", "count", "fatal"}]}`, where a value the GPU does not
//! report is left out and `xids` is absent when the kernel log could not be read.
//!
//! Fields added later within version 1 are ignored by this reader.

mod command;
mod probe;

pub use command::{Outcome, selftest_command};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::nvml::{MemoryHealth, PcieLink};
use super::{GpuFacts, round2};
use crate::config::parse_pci_address;
use crate::fsutil::FsError;

/// The file name under the data dir.
pub const FILE_NAME: &str = "gpu-inventory.json";
/// The format version this agent reads and writes.
pub const VERSION: u32 = 1;

/// The inventory file exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("the GPU inventory {path}: {field} {problem}; run `qudata-agent selftest` again")]
    Invalid { path: PathBuf, field: String, problem: &'static str },
    #[error(
        "the GPU inventory {path} is not valid JSON ({source}); run `qudata-agent selftest` again"
    )]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("cannot read the GPU inventory {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the GPU inventory {path} has version {found}, this agent reads {VERSION}; update the agent"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write the GPU inventory: {source}")]
    Write { source: FsError },
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfTestInventory {
    pub version: u32,
    #[serde(default)]
    pub tested_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    pub cuda_version: String,
    pub gpus: Vec<TestedGpu>,
}

/// One GPU as the self-test saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestedGpu {
    pub pci_address: String,
    pub name: String,
    pub memory_total_mib: u64,
    #[serde(default, skip_serializing_if = "PcieLink::is_empty")]
    pub pcie: PcieLink,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_limit_w: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Verdict>,
}

/// Whether a GPU is fit to be rented, as the self-test judged it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub ok: bool,
    /// Why not, one sentence each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub memory: MemoryHealth,
    /// Xids the kernel logged for this GPU since boot; `None`: the log could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xids: Option<Vec<XidCount>>,
}

/// How often one Xid was logged for one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidCount {
    pub xid: u32,
    pub count: u32,
    /// The GPU itself is damaged or lost (not a program's fault).
    pub fatal: bool,
}

impl SelfTestInventory {
    /// Reads and checks the file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<SelfTestInventory>, SelfTestError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SelfTestError::Read { path: path.into(), source }),
        };
        // The version first, so a newer format is named as such instead of as a parse error.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let parse = |source| SelfTestError::Parse { path: path.into(), source };
        let found = serde_json::from_slice::<Versioned>(&bytes).map_err(parse)?.version;
        if found != VERSION {
            return Err(SelfTestError::Version { path: path.into(), found });
        }
        let inventory: SelfTestInventory = serde_json::from_slice(&bytes).map_err(parse)?;
        inventory.check().map_err(|(field, problem)| SelfTestError::Invalid {
            path: path.into(),
            field,
            problem,
        })?;
        Ok(Some(inventory))
    }

    /// Writes the file atomically, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), SelfTestError> {
        let mut text = serde_json::to_vec_pretty(self).expect("an inventory serialises");
        text.push(b'\n');
        crate::fsutil::write_atomic(path, &text).map_err(|source| SelfTestError::Write { source })
    }

    fn check(&self) -> Result<(), (String, &'static str)> {
        // A host with no driver has no CUDA version, and no GPU to need one.
        let empty = self.gpus.is_empty() && self.cuda_version.is_empty();
        if !empty && parse_cuda(&self.cuda_version).is_none() {
            return Err(("cuda_version".into(), "is not a version like 12.4"));
        }
        for (i, gpu) in self.gpus.iter().enumerate() {
            let field = |name: &str| format!("gpus[{i}].{name}");
            if parse_pci_address(&gpu.pci_address).is_err() {
                return Err((field("pci_address"), "is not a PCI address like 0000:65:00.0"));
            }
            if gpu.name.trim().is_empty() {
                return Err((field("name"), "is empty"));
            }
            if gpu.memory_total_mib == 0 {
                return Err((field("memory_total_mib"), "is 0"));
            }
        }
        Ok(())
    }

    /// `/init/host` facts; only the GPUs of `only` (`QUDATA_GPU_PCI_ADDRS`) when given.
    pub fn facts(&self, only: Option<&[String]>) -> GpuFacts {
        let selected: Vec<&TestedGpu> = self
            .gpus
            .iter()
            .filter(|g| {
                let address = g.pci_address.to_ascii_lowercase();
                only.is_none_or(|list| list.contains(&address))
            })
            .collect();
        let first = selected.first();
        GpuFacts {
            name: first.map(|g| g.name.trim().to_owned()).unwrap_or_default(),
            count: selected.len() as u32,
            vram_gib: first.map(|g| round2(g.memory_total_mib as f64 / 1024.0)).unwrap_or(0.0),
            max_cuda: parse_cuda(&self.cuda_version).unwrap_or(0.0),
        }
    }
}

/// `"12.4"` → 12.4.
fn parse_cuda(v: &str) -> Option<f64> {
    let (major, minor) = v.trim().split_once('.')?;
    let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
    format!("{major}.{minor}").parse().ok()
}

#[cfg(test)]
mod tests;
