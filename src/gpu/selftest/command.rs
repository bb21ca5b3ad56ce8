//! `qudata-agent selftest`: the probe, the inventory file, one line per GPU.

use std::path::Path;

use super::probe::{Probe, ProbeInputs, probe};
use super::{FILE_NAME, SelfTestError, TestedGpu};
use crate::config::Config;
use crate::vfio::PciAddress;

/// What the command prints, and whether every GPU passed.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    /// Notes beside `--json` output (stdout is then the inventory alone).
    pub stderr: String,
    /// No GPU failed (also with no driver: nothing to fail).
    pub ok: bool,
}

/// Probes, writes the inventory to `out` (default `<data dir>/gpu-inventory.json`) and says
/// what it found. `only` is the validated `QUDATA_GPU_PCI_ADDRS`.
pub fn selftest_command(
    cfg: &Config,
    only: Option<&[PciAddress]>,
    json: bool,
    out: Option<&Path>,
) -> Result<Outcome, SelfTestError> {
    let path = match out {
        Some(path) => path.to_path_buf(),
        None => {
            crate::fsutil::ensure_state_dir(&cfg.data_dir)
                .map_err(|source| SelfTestError::Write { source })?;
            cfg.data_dir.join(FILE_NAME)
        }
    };
    let inputs = ProbeInputs { nvml_library: &cfg.nvml_library, kmsg: &cfg.kmsg_path, only };
    let found = probe(&inputs);
    found.inventory.write(&path)?;
    let notes = notes(&found, &path);
    let ok = found.ok();
    if json {
        let mut stdout = serde_json::to_string_pretty(&found.inventory).expect("serialises");
        stdout.push('\n');
        return Ok(Outcome { stdout, stderr: notes.concat(), ok });
    }
    let mut stdout: String = found.inventory.gpus.iter().map(line).collect();
    stdout.push_str(&notes.concat());
    Ok(Outcome { stdout, stderr: String::new(), ok })
}

/// Everything but the GPU lines: what could not be seen, and where the file went.
fn notes(found: &Probe, path: &Path) -> Vec<String> {
    let path = path.display();
    if let Some(e) = &found.no_driver {
        return vec![format!("no NVIDIA driver ({e}): wrote an empty GPU inventory to {path}\n")];
    }
    let mut out: Vec<String> = found.unreadable.iter().map(|e| format!("{e}\n")).collect();
    for gpu in &found.missing {
        out.push(format!(
            "{gpu}  not seen by the NVIDIA driver (already on vfio-pci, or off the bus): not tested\n"
        ));
    }
    if let Some(e) = &found.kmsg_error {
        out.push(format!("{e}: Xids not checked\n"));
    }
    let inventory = &found.inventory;
    let driver = inventory.driver_version.as_deref().unwrap_or("of unknown version");
    let cuda = if inventory.cuda_version.is_empty() { "?" } else { &inventory.cuda_version };
    let count = inventory.gpus.len();
    out.push(format!("driver {driver}, CUDA {cuda}: {count} GPU(s) written to {path}\n"));
    out
}

/// `0000:65:00.0  NVIDIA H100 80GB HBM3  81559 MiB  PCIe gen5 x16 (max gen5 x16)  ECC on  700 W  ok`
fn line(gpu: &TestedGpu) -> String {
    let known = |v: Option<u32>| v.map_or("?".to_owned(), |v| v.to_string());
    let pcie = &gpu.pcie;
    let link = format!(
        "PCIe gen{} x{} (max gen{} x{})",
        known(pcie.gen_current),
        known(pcie.width_current),
        known(pcie.gen_max),
        known(pcie.width_max)
    );
    let ecc = match gpu.ecc_enabled {
        Some(true) => "ECC on",
        Some(false) => "ECC off",
        None => "ECC n/a",
    };
    let power = gpu.power_limit_w.map_or("power limit n/a".to_owned(), |w| format!("{w} W"));
    let verdict = match &gpu.health {
        Some(h) if !h.ok => format!("not ok: {}", h.reasons.join("; ")),
        _ => "ok".to_owned(),
    };
    format!(
        "{}  {}  {} MiB  {link}  {ecc}  {power}  {verdict}\n",
        gpu.pci_address, gpu.name, gpu.memory_total_mib
    )
}
