//! What the self-test finds on the host: each GPU's NVML facts and memory health, and the
//! errors the kernel logged for it since boot.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{SecondsFormat, Utc};

use super::{SelfTestInventory, TestedGpu, VERSION, Verdict, XidCount};
use crate::gpu::kmsg::{self, KmsgReader};
use crate::gpu::nvml::{DeviceFacts, Nvml, NvmlError};
use crate::vfio::PciAddress;

/// Where the self-test looks.
pub struct ProbeInputs<'a> {
    pub nvml_library: &'a Path,
    /// The kernel log (`/dev/kmsg`: this boot's records).
    pub kmsg: &'a Path,
    /// `QUDATA_GPU_PCI_ADDRS`: only these GPUs are tested; `None`: every GPU of the driver.
    pub only: Option<&'a [PciAddress]>,
}

/// The inventory to write and what stopped the self-test from seeing everything.
#[derive(Debug)]
pub struct Probe {
    pub inventory: SelfTestInventory,
    /// NVML could not be loaded: no driver (the inventory is empty).
    pub no_driver: Option<NvmlError>,
    /// The driver failed to answer for a GPU (or to count them), one sentence each.
    pub unreadable: Vec<String>,
    /// Offered GPUs the driver does not own (on vfio-pci already, or off the bus).
    pub missing: Vec<PciAddress>,
    /// Why the kernel log could not be read (Xids not checked).
    pub kmsg_error: Option<String>,
}

impl Probe {
    /// Every GPU was seen and found fit.
    pub fn ok(&self) -> bool {
        let healthy = |g: &TestedGpu| g.health.as_ref().is_none_or(|h| h.ok);
        self.unreadable.is_empty()
            && self.missing.is_empty()
            && self.inventory.gpus.iter().all(healthy)
    }
}

/// Runs the self-test. Blocking (dlopen, nvmlInit, the kernel log).
pub fn probe(inputs: &ProbeInputs<'_>) -> Probe {
    let mut probe = Probe {
        inventory: SelfTestInventory {
            version: VERSION,
            tested_at: Some(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)),
            driver_version: None,
            cuda_version: String::new(),
            gpus: Vec::new(),
        },
        no_driver: None,
        unreadable: Vec::new(),
        missing: Vec::new(),
        kmsg_error: None,
    };
    let nvml = match Nvml::load(inputs.nvml_library) {
        Ok(nvml) => nvml,
        Err(e) => {
            probe.no_driver = Some(e);
            return probe;
        }
    };
    probe.inventory.driver_version = nvml.driver_version().ok();
    match nvml.cuda_version() {
        Ok(cuda) => probe.inventory.cuda_version = cuda,
        Err(e) => probe.unreadable.push(e.to_string()),
    }
    let devices = match nvml.devices() {
        Ok(devices) => devices,
        Err(e) => {
            probe.unreadable.push(e.to_string());
            return probe;
        }
    };
    let kernel = match kernel_log(inputs.kmsg) {
        Ok(found) => Some(found),
        Err(e) => {
            probe.kmsg_error =
                Some(format!("cannot read the kernel log {}: {e}", inputs.kmsg.display()));
            None
        }
    };
    let offered = |a: &PciAddress| inputs.only.is_none_or(|list| list.contains(a));
    for device in devices {
        match device {
            Ok(d) if offered(&d.address) => {
                let logged =
                    kernel.as_ref().map(|k| k.get(&d.address).cloned().unwrap_or_default());
                probe.inventory.gpus.push(tested(d, logged));
            }
            Ok(_) => {}
            Err(e) => probe.unreadable.push(e.to_string()),
        }
    }
    let seen: Vec<&str> = probe.inventory.gpus.iter().map(|g| g.pci_address.as_str()).collect();
    probe.missing = inputs
        .only
        .unwrap_or_default()
        .iter()
        .filter(|a| !seen.contains(&a.as_str()))
        .cloned()
        .collect();
    probe
}

fn tested(d: DeviceFacts, logged: Option<Logged>) -> TestedGpu {
    let mut reasons: Vec<String> =
        d.memory.problems().iter().map(|p| format!("NVML reports {p}")).collect();
    if let Some(logged) = &logged {
        for (reason, n) in &logged.failures {
            let times = if *n > 1 { format!(" {n} times") } else { String::new() };
            reasons.push(format!("{reason}{times} since boot"));
        }
    }
    TestedGpu {
        pci_address: d.address.to_string(),
        name: d.name,
        memory_total_mib: d.memory_total_mib,
        pcie: d.pcie,
        ecc_enabled: d.ecc_enabled,
        power_limit_w: d.power_limit_w,
        health: Some(Verdict {
            ok: reasons.is_empty(),
            reasons,
            memory: d.memory,
            xids: logged.map(|l| l.xids),
        }),
    }
}

/// What the kernel logged about one GPU.
#[derive(Clone, Debug, Default, PartialEq)]
struct Logged {
    /// Every Xid, by number.
    xids: Vec<XidCount>,
    /// The errors that make it unfit (fatal Xids, vfio-pci failures) with how often each came.
    failures: Vec<(String, u32)>,
}

/// Reads the whole log (for `/dev/kmsg`: every record of this boot still in the ring).
fn kernel_log(path: &Path) -> std::io::Result<BTreeMap<PciAddress, Logged>> {
    let mut reader = KmsgReader::open(path)?;
    let mut found = BTreeMap::new();
    loop {
        let records = reader.read_new();
        if records.is_empty() {
            return Ok(found);
        }
        for record in &records {
            note(&mut found, record);
        }
    }
}

fn note(found: &mut BTreeMap<PciAddress, Logged>, record: &str) {
    if let Some(x) = kmsg::xid_of_record(record) {
        let xids = &mut found.entry(x.gpu).or_default().xids;
        match xids.iter_mut().find(|c| c.xid == x.xid) {
            Some(c) => c.count += 1,
            None => xids.push(XidCount { xid: x.xid, count: 1, fatal: x.fatal.is_some() }),
        }
    }
    if let Some(event) = kmsg::parse_record(record) {
        let failures = &mut found.entry(event.gpu).or_default().failures;
        match failures.iter_mut().find(|(r, _)| *r == event.reason) {
            Some((_, n)) => *n += 1,
            None => failures.push((event.reason, 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_counted_per_gpu_and_xid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        let lines = [
            "3,1,10,-;NVRM: Xid (PCI:0000:65:00): 79, pid=1, GPU has fallen off the bus.",
            " SUBSYSTEM=pci",
            "4,2,20,-;NVRM: Xid (PCI:0000:65:00): 13, pid=2, Graphics Exception",
            "3,3,30,-;NVRM: Xid (PCI:0000:65:00): 79, pid=1, GPU has fallen off the bus.",
            "4,4,40,-;NVRM: Xid (PCI:0000:b3:00): 13, pid=2, Graphics Exception",
            "6,5,50,-;usb 1-1: new high-speed USB device",
        ];
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let found = kernel_log(&path).unwrap();
        let a: PciAddress = "0000:65:00.0".parse().unwrap();
        let b: PciAddress = "0000:b3:00.0".parse().unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        let xid = |xid, count, fatal| XidCount { xid, count, fatal };
        assert_eq!(found[&a].xids, [xid(79, 2, true), xid(13, 1, false)]);
        assert_eq!(
            found[&a].failures,
            [("the kernel logged Xid 79 (GPU has fallen off the bus)".to_owned(), 2)]
        );
        assert_eq!(found[&b].xids, [xid(13, 1, false)]);
        assert!(found[&b].failures.is_empty(), "a program's fault does not fail a GPU");
        assert!(kernel_log(&dir.path().join("none")).is_err());
    }
}
