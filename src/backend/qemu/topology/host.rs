//! The host facts a VM's placement depends on, read from sysfs (always through the injectable
//! root, so tests read fixture trees): NUMA nodes, their CPUs and huge pages, GPUs' nodes.

use std::path::{Path, PathBuf};

use super::{HostFacts, HostNode, HugePool, TopologyError, cpulist};
use crate::vfio::{PciAddress, SysfsRoot};

impl HostFacts {
    /// Reads the host's nodes and huge page pools. A kernel without NUMA (no
    /// `devices/system/node`) is one node 0 holding every online CPU.
    pub fn read(sysfs: &SysfsRoot) -> Result<HostFacts, TopologyError> {
        let node_dir = sysfs.join("devices/system/node");
        let mut nodes = Vec::new();
        for (id, dir) in numbered(&node_dir, "node")? {
            let cpus = read_cpus(&dir.join("cpulist"))?;
            let hugepages = pools(&dir.join("hugepages"))?;
            let first_core = first_core(sysfs, &cpus)?;
            nodes.push(HostNode { id, cpus, first_core, hugepages });
        }
        let online = sysfs.join("devices/system/cpu/online");
        // A tree without CPUs at all (a test's sysfs of PCI devices only) places nothing.
        if nodes.is_empty() && online.exists() {
            let cpus = read_cpus(&online)?;
            let first_core = first_core(sysfs, &cpus)?;
            nodes.push(HostNode { id: 0, cpus, first_core, hugepages: Vec::new() });
        }
        let hugepages = pools(&sysfs.join("kernel/mm/hugepages"))?;
        Ok(HostFacts { nodes, hugepages })
    }
}

/// The NUMA node of a PCI device; `None` where the firmware does not say (`-1`) or the
/// attribute is missing (a kernel without NUMA).
pub fn device_node(sysfs: &SysfsRoot, addr: &PciAddress) -> Result<Option<u32>, TopologyError> {
    let path = sysfs.device_dir(addr).join("numa_node");
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::Read { path, source }),
        Ok(text) => match text.trim().parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Some(n as u32)),
            Ok(_) => Ok(None),
            Err(_) => Err(TopologyError::Malformed { path, text: text.trim().to_owned() }),
        },
    }
}

/// The first CPU of `cpus` and its hyper-threads (`thread_siblings_list`; alone where the
/// kernel does not say).
fn first_core(sysfs: &SysfsRoot, cpus: &[u32]) -> Result<Vec<u32>, TopologyError> {
    let Some(first) = cpus.first() else { return Ok(Vec::new()) };
    let path = sysfs.join(format!("devices/system/cpu/cpu{first}/topology/thread_siblings_list"));
    if !path.exists() {
        return Ok(vec![*first]);
    }
    read_cpus(&path)
}

/// The pools of a `hugepages` dir (`hugepages-<size>kB/{nr,free}_hugepages`), smallest page
/// first; none where the dir is missing.
fn pools(dir: &Path) -> Result<Vec<HugePool>, TopologyError> {
    let mut out = Vec::new();
    for (name, path) in entries(dir)? {
        let Some(kib) = name.strip_prefix("hugepages-").and_then(|s| s.strip_suffix("kB")) else {
            continue;
        };
        let Ok(page_kib) = kib.parse() else { continue };
        let total = read_number(&path.join("nr_hugepages"))?;
        let free = read_number(&path.join("free_hugepages"))?;
        out.push(HugePool { page_kib, total, free });
    }
    out.sort_by_key(|p| p.page_kib);
    Ok(out)
}

/// `<prefix><n>` entries of `dir`, by number; none where the dir is missing.
fn numbered(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>, TopologyError> {
    let mut out: Vec<(u32, PathBuf)> = entries(dir)?
        .into_iter()
        .filter_map(|(name, path)| Some((name.strip_prefix(prefix)?.parse().ok()?, path)))
        .collect();
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, TopologyError> {
    let list = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        list => list.map_err(|source| TopologyError::Read { path: dir.to_owned(), source })?,
    };
    Ok(list
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), e.path())))
        .collect())
}

fn read(path: &Path) -> Result<String, TopologyError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| TopologyError::Read { path: path.to_owned(), source })
}

fn read_cpus(path: &Path) -> Result<Vec<u32>, TopologyError> {
    let text = read(path)?;
    cpulist::parse(&text).ok_or_else(|| TopologyError::Malformed { path: path.to_owned(), text })
}

fn read_number(path: &Path) -> Result<u64, TopologyError> {
    let text = read(path)?;
    text.parse().map_err(|_| TopologyError::Malformed { path: path.to_owned(), text })
}
