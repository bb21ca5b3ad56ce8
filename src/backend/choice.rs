//! Which backend builds instances on a host, as a pure rule over the setting and what the
//! host offers: used by `run` (`agent::backends`) and shown by `doctor`.

use crate::config::BackendChoice;
use crate::instance::model::BackendKind;
use crate::vfio::{PciAddress, SysfsError, SysfsRoot};

/// Why the offered GPUs cannot be passed to VMs.
#[derive(Debug, thiserror::Error)]
pub enum NoPassthrough {
    #[error("the kernel made no IOMMU groups")]
    NoIommuGroups,
    #[error("{gpu} is not a PCI address")]
    NotAnAddress { gpu: String },
    #[error("{gpu} is in no IOMMU group")]
    NoGroup { gpu: String },
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
}

/// What `auto` (or the setting) says to try, in order, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub try_in_order: Vec<BackendKind>,
    pub reason: String,
}

/// The choice as a pure function of the setting and the host: QEMU when the GPUs can go to
/// VMs; Docker when they cannot (no IOMMU); with no GPUs to offer, VMs first (any host runs
/// them, under TCG at worst) and containers where VMs cannot run.
pub fn order(choice: BackendChoice, gpus: usize, passthrough: &Result<(), NoPassthrough>) -> Order {
    use BackendKind::{Docker, Qemu};
    let (try_in_order, reason) = match (choice, gpus, passthrough) {
        (BackendChoice::Qemu, ..) => (vec![Qemu], "QUDATA_BACKEND=qemu".to_owned()),
        (BackendChoice::Docker, ..) => (vec![Docker], "QUDATA_BACKEND=docker".to_owned()),
        (BackendChoice::Auto, 0, _) => (
            vec![Qemu, Docker],
            "auto: no GPUs to offer, so VMs first and containers where VMs cannot run".to_owned(),
        ),
        (BackendChoice::Auto, n, Ok(())) => {
            (vec![Qemu], format!("auto: IOMMU is on and the {n} GPU(s) can be passed to VMs"))
        }
        (BackendChoice::Auto, _, Err(why)) => {
            (vec![Docker], format!("auto: the GPUs cannot be passed to VMs ({why})"))
        }
    };
    Order { try_in_order, reason }
}

/// Whether every offered GPU can go to a VM: the kernel made IOMMU groups and each GPU is in
/// one.
pub fn passthrough(sysfs: &SysfsRoot, gpus: &[String]) -> Result<(), NoPassthrough> {
    if !sysfs.has_iommu_groups()? {
        return Err(NoPassthrough::NoIommuGroups);
    }
    for gpu in gpus {
        let not_an_address = || NoPassthrough::NotAnAddress { gpu: gpu.clone() };
        let addr: PciAddress = gpu.parse().map_err(|_| not_an_address())?;
        if sysfs.iommu_group(&addr)?.is_none() {
            return Err(NoPassthrough::NoGroup { gpu: gpu.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendKind::{Docker, Qemu};

    #[test]
    fn auto_prefers_vms_only_where_gpus_can_go_to_them() {
        let on = Ok(());
        let off = Err(NoPassthrough::NoIommuGroups);
        let o = order(BackendChoice::Auto, 2, &on);
        assert_eq!(o.try_in_order, vec![Qemu]);
        assert_eq!(o.reason, "auto: IOMMU is on and the 2 GPU(s) can be passed to VMs");
        let o = order(BackendChoice::Auto, 2, &off);
        assert_eq!(o.try_in_order, vec![Docker]);
        assert_eq!(
            o.reason,
            "auto: the GPUs cannot be passed to VMs (the kernel made no IOMMU groups)"
        );
        assert_eq!(order(BackendChoice::Auto, 0, &off).try_in_order, vec![Qemu, Docker]);
        assert_eq!(order(BackendChoice::Docker, 2, &on).try_in_order, vec![Docker]);
        assert_eq!(order(BackendChoice::Qemu, 2, &off).try_in_order, vec![Qemu]);
    }

    #[test]
    fn passthrough_needs_groups_and_each_gpu_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = SysfsRoot::new(dir.path());
        let gpu = "0000:65:00.0".to_owned();
        let none = passthrough(&sysfs, std::slice::from_ref(&gpu));
        assert!(matches!(none, Err(NoPassthrough::NoIommuGroups)), "{none:?}");
        std::fs::create_dir_all(dir.path().join("kernel/iommu_groups/7/devices")).unwrap();
        let device = dir.path().join("bus/pci/devices").join(&gpu);
        std::fs::create_dir_all(&device).unwrap();
        let err = passthrough(&sysfs, std::slice::from_ref(&gpu)).unwrap_err();
        assert_eq!(err.to_string(), "0000:65:00.0 is in no IOMMU group");
        std::os::unix::fs::symlink(
            dir.path().join("kernel/iommu_groups/7"),
            device.join("iommu_group"),
        )
        .unwrap();
        assert!(passthrough(&sysfs, &[gpu]).is_ok());
    }
}
