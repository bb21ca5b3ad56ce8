//! What `/proc` says about GPUs: processes holding NVIDIA device nodes, the minor number the
//! NVIDIA driver gave a GPU, and the `vfio-pci.ids` the kernel was booted with. The root is
//! injectable like the sysfs root.

use std::fmt;
use std::path::Path;

use super::pci::PciAddress;

/// A process with an open NVIDIA device node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `comm` of the process (its short name).
    pub name: String,
    /// The device node it holds, e.g. `/dev/nvidia0`.
    pub node: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {}, {})", self.name, self.pid, self.node)
    }
}

/// The `/dev/nvidiaN` minor of a GPU the NVIDIA driver owns (`Device Minor:` in
/// `driver/nvidia/gpus/<addr>/information`); `None` when the driver does not say.
pub fn nvidia_minor(proc_root: &Path, gpu: &PciAddress) -> Option<u32> {
    let path = proc_root.join("driver/nvidia/gpus").join(gpu.as_str()).join("information");
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("Device Minor:"))?;
    line.split(':').nth(1)?.trim().parse().ok()
}

/// Whether `node` is a per-GPU node: `/dev/nvidia<minor>`, or any `/dev/nvidiaN` when the
/// minor is unknown. Shared nodes (`nvidiactl`, `nvidia-uvm`) do not pin one GPU.
pub fn is_gpu_node(node: &str, minor: Option<u32>) -> bool {
    let Some(digits) = node.strip_prefix("/dev/nvidia") else { return false };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    minor.is_none_or(|m| digits == m.to_string())
}

/// Every process (other than this one) holding a node for which `wanted` says yes. Processes
/// that vanish or cannot be read during the scan are skipped.
pub fn holders(proc_root: &Path, wanted: impl Fn(&str) -> bool) -> Vec<Holder> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return out };
    let own = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let held = fds.flatten().find_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let node = target.to_str()?.to_owned();
            wanted(&node).then_some(node)
        });
        if let Some(node) = held {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            out.push(Holder { pid, name: comm.trim().to_owned(), node });
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

/// The `vendor:device` pairs of `vfio-pci.ids=` on a kernel command line, lowercased: devices
/// the host keeps on vfio-pci from boot, so a released GPU stays there.
pub fn vfio_pci_ids(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .take_while(|t| *t != "--") // what follows `--` is for init, not the kernel
        .filter_map(|t| t.strip_prefix("vfio-pci.ids="))
        .flat_map(|list| list.split(','))
        .filter(|id| !id.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vfio_pci_ids_of_the_kernel_only() {
        let cmdline = "BOOT_IMAGE=/vmlinuz intel_iommu=on vfio-pci.ids=10DE:2330,10de:22bc quiet \
                       -- vfio-pci.ids=1234:5678\n";
        assert_eq!(vfio_pci_ids(cmdline), ["10de:2330", "10de:22bc"]);
        assert!(vfio_pci_ids("ro quiet").is_empty());
    }

    #[test]
    fn per_gpu_nodes_match_the_minor() {
        assert!(is_gpu_node("/dev/nvidia3", Some(3)));
        assert!(!is_gpu_node("/dev/nvidia3", Some(1)));
        assert!(is_gpu_node("/dev/nvidia12", None));
        assert!(!is_gpu_node("/dev/nvidiactl", None));
        assert!(!is_gpu_node("/dev/nvidia-uvm", None));
        assert!(!is_gpu_node("/dev/null", None));
    }

    #[test]
    fn finds_holders_and_minors_in_a_proc_tree() {
        let proc = tempfile::tempdir().unwrap();
        for (pid, comm, node) in [
            (40, "nvidia-smi", "/dev/nvidia0"),
            (41, "python3", "/dev/nvidia1"),
            (42, "sh", "/dev/null"),
        ] {
            let dir = proc.path().join(pid.to_string());
            std::fs::create_dir_all(dir.join("fd")).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            std::os::unix::fs::symlink(node, dir.join("fd/3")).unwrap();
        }
        let gpu: PciAddress = "0000:65:00.0".parse().unwrap();
        let info = proc.path().join("driver/nvidia/gpus/0000:65:00.0");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(info.join("information"), "Model: H100\nDevice Minor: \t 1\n").unwrap();
        let minor = nvidia_minor(proc.path(), &gpu);
        assert_eq!(minor, Some(1));
        let found = holders(proc.path(), |n| is_gpu_node(n, minor));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].to_string(), "python3 (pid 41, /dev/nvidia1)");
        assert_eq!(holders(proc.path(), |n| is_gpu_node(n, None)).len(), 2);
    }
}
