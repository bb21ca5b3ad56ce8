//! The sysfs reader and the NVIDIA PCI inventory against fake sysfs trees.

use qudata_agent::gpu::{GpuDriver, Inventory, RejectReason};
use qudata_agent::vfio::{PciAddress, SysfsError};

use crate::support::sysfs::{
    CLASS_3D, CLASS_AUDIO, CLASS_BRIDGE, CLASS_ETHERNET, CLASS_USB, FakeSysfs,
};

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

/// Two GPUs as on a typical server: an H100 (3D class) alone in its group on nvidia, and a
/// consumer card with HDMI audio and USB-C functions sharing a group with a bridge.
fn two_gpu_host() -> FakeSysfs {
    FakeSysfs::new()
        .device("0000:00:00.0", 0x8086, 0x09a2, 0x060000)
        .driver("pcieport")
        .device("0000:17:00.0", 0x8086, 0x1593, CLASS_ETHERNET)
        .driver("ice")
        .group(3)
        .device("0000:65:00.0", 0x10de, 0x2330, CLASS_3D)
        .driver("nvidia")
        .group(12)
        .bars(&[(0, 16 << 20, false), (1, 128 << 30, true), (3, 32 << 20, true)])
        .device("0000:b2:00.0", 0x8086, 0x347a, CLASS_BRIDGE)
        .driver("pcieport")
        .group(40)
        .gpu("0000:b3:00.0", 0x2684)
        .driver("vfio-pci")
        .group(40)
        .function("0000:b3:00.1", CLASS_AUDIO)
        .driver("snd_hda_intel")
        .group(40)
        .function("0000:b3:00.2", CLASS_USB)
        .group(40)
        .module("vfio")
}

#[test]
fn sysfs_reads_ids_drivers_groups_and_modules() {
    let fake = two_gpu_host();
    let sysfs = fake.root();
    assert_eq!(sysfs.pci_devices().unwrap().len(), 7);
    let gpu = addr("0000:65:00.0");
    assert_eq!(sysfs.vendor(&gpu).unwrap(), 0x10de);
    assert_eq!(sysfs.device_id(&gpu).unwrap(), 0x2330);
    assert_eq!(sysfs.class(&gpu).unwrap(), 0x030200);
    assert_eq!(sysfs.driver(&gpu).unwrap().as_deref(), Some("nvidia"));
    assert_eq!(sysfs.iommu_group(&gpu).unwrap(), Some(12));
    assert_eq!(sysfs.driver(&addr("0000:b3:00.2")).unwrap(), None, "unbound");
    assert_eq!(sysfs.iommu_group(&addr("0000:00:00.0")).unwrap(), None, "no group");
    assert_eq!(sysfs.iommu_groups().unwrap(), [3, 12, 40]);
    assert!(sysfs.has_iommu_groups().unwrap());
    assert!(sysfs.module_loaded("vfio"));
    assert!(!sysfs.module_loaded("vfio-pci"), "names are compared with - read as _");
    assert_eq!(
        sysfs.read_attr(&sysfs.device_dir(&gpu).join("device")).unwrap(),
        "0x2330",
        "attributes are trimmed"
    );
}

#[test]
fn group_members_are_every_device_of_the_group() {
    let fake = two_gpu_host();
    let members = fake.root().iommu_group_devices(40).unwrap();
    let names: Vec<&str> = members.iter().map(PciAddress::as_str).collect();
    assert_eq!(names, ["0000:b2:00.0", "0000:b3:00.0", "0000:b3:00.1", "0000:b3:00.2"]);
}

#[test]
fn a_tree_without_groups_has_no_iommu() {
    let fake = FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("nvidia");
    assert!(!fake.root().has_iommu_groups().unwrap());
    assert_eq!(fake.root().iommu_group(&addr("0000:65:00.0")).unwrap(), None);
}

#[test]
fn a_garbled_attribute_names_the_file() {
    let fake = FakeSysfs::new().gpu("0000:65:00.0", 0x2330);
    std::fs::write(fake.path().join("devices/pci0000:65/0000:65:00.0/vendor"), "nvidia\n").unwrap();
    let err = fake.root().vendor(&addr("0000:65:00.0")).unwrap_err();
    match &err {
        SysfsError::Parse { path, value, .. } => {
            assert!(path.ends_with("0000:65:00.0/vendor"), "{path:?}");
            assert_eq!(value, "nvidia");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn inventory_finds_nvidia_gpus_with_their_slot_functions() {
    let fake = two_gpu_host();
    let inv = Inventory::scan(&fake.root(), None).unwrap();
    assert!(inv.rejected.is_empty());
    let found: Vec<(&str, u16, &GpuDriver)> =
        inv.gpus.iter().map(|g| (g.address.as_str(), g.device, &g.driver)).collect();
    assert_eq!(
        found,
        [
            ("0000:65:00.0", 0x2330, &GpuDriver::Nvidia),
            ("0000:b3:00.0", 0x2684, &GpuDriver::VfioPci)
        ]
    );

    let h100 = &inv.gpus[0];
    assert_eq!(h100.iommu_group, Some(12));
    assert_eq!(h100.bar64_bytes, (128 << 30) + (32 << 20), "BAR1 + BAR3 from `resource`");
    assert_eq!(h100.group_devices, [addr("0000:65:00.0")]);
    assert!(h100.slot_functions.is_empty());

    let card = &inv.gpus[1];
    assert_eq!(card.iommu_group, Some(40));
    assert_eq!(card.group_devices.len(), 4, "the bridge is a group member too");
    let functions: Vec<(&str, u32, Option<&str>)> = card
        .slot_functions
        .iter()
        .map(|f| (f.address.as_str(), f.class, f.driver.as_deref()))
        .collect();
    assert_eq!(
        functions,
        [("0000:b3:00.1", CLASS_AUDIO, Some("snd_hda_intel")), ("0000:b3:00.2", CLASS_USB, None)]
    );
}

#[test]
fn the_audio_function_alone_is_not_a_gpu_and_nouveau_is_reported() {
    let fake = FakeSysfs::new()
        .gpu("0000:01:00.0", 0x1eb8)
        .driver("nouveau")
        .function("0000:01:00.1", CLASS_AUDIO);
    let inv = Inventory::scan(&fake.root(), None).unwrap();
    assert_eq!(inv.gpus.len(), 1);
    assert_eq!(inv.gpus[0].driver, GpuDriver::Nouveau);
    assert_eq!(inv.gpus[0].iommu_group, None);
    assert!(inv.gpus[0].group_devices.is_empty());
}

#[test]
fn the_address_filter_keeps_listed_gpus_and_reports_the_rest() {
    let fake = two_gpu_host();
    let only = [addr("0000:b3:00.0"), addr("0000:17:00.0"), addr("0000:99:00.0")];
    let inv = Inventory::scan(&fake.root(), Some(&only)).unwrap();
    let gpus: Vec<&str> = inv.gpus.iter().map(|g| g.address.as_str()).collect();
    assert_eq!(gpus, ["0000:b3:00.0"], "the H100 is not listed, so it is not offered");
    let rejected: Vec<String> = inv.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        rejected,
        [
            "0000:17:00.0: vendor 8086 class 020000 is not an NVIDIA GPU",
            "0000:99:00.0: no such PCI device",
        ]
    );
    assert_eq!(inv.rejected[1].reason, RejectReason::NoSuchDevice);
}

#[test]
fn a_host_without_nvidia_devices_has_an_empty_inventory() {
    let fake = FakeSysfs::new().device("0000:00:02.0", 0x8086, 0x4680, 0x030000).driver("i915");
    let inv = Inventory::scan(&fake.root(), None).unwrap();
    assert!(inv.gpus.is_empty() && inv.rejected.is_empty());
}
