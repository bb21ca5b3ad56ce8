//! cpu, kvm, iommu, vfio and gpu checks against fake hosts.

use std::os::unix::fs::symlink;

use qudata_agent::config::BackendChoice;
use qudata_agent::doctor::{self, Status};

use crate::support::host::FakeHost;
use crate::support::sysfs::{CLASS_AUDIO, CLASS_ETHERNET, FakeSysfs};

#[test]
fn cpu_flags_vmx_svm_or_none() {
    let host = FakeHost::new();
    let c = doctor::cpu(&host.view());
    assert_eq!((c.status, c.detail.as_str()), (Status::Ok, "Intel VT-x (vmx)"));

    host.write("proc/cpuinfo", "flags\t\t: fpu svm\n");
    assert_eq!(doctor::cpu(&host.view()).detail, "AMD-V (svm)");

    host.write("proc/cpuinfo", "flags\t\t: fpu hypervisor\n");
    let c = doctor::cpu(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("TCG"), "{}", c.detail);
    assert!(c.fix.unwrap().contains("VT-x"));

    std::fs::remove_file(host.join("proc/cpuinfo")).unwrap();
    assert_eq!(doctor::cpu(&host.view()).status, Status::Warn);
}

#[test]
fn host_ports_in_the_kernels_ephemeral_range_warn_with_the_sysctl_that_reserves_them() {
    let host = FakeHost::new();
    host.write("proc/sys/net/ipv4/ip_local_port_range", "32768\t60999\n");
    host.write("proc/sys/net/ipv4/ip_local_reserved_ports", "\n");
    let c = doctor::host_ports(&host.view());
    assert_eq!(c.status, Status::Ok, "{c:?}");
    assert!(
        c.detail.contains("hands none to outgoing connections (ephemeral range 32768-60999)"),
        "{c:?}"
    );

    host.write("proc/sys/net/ipv4/ip_local_port_range", "1024\t65535\n");
    host.write("proc/sys/net/ipv4/ip_local_reserved_ports", "8080\n");
    let c = doctor::host_ports(&host.view());
    assert_eq!(c.status, Status::Warn, "{c:?}");
    assert!(c.detail.starts_with("3000 of the host ports 20000-22999"), "{c:?}");
    let fix = c.fix.unwrap();
    assert!(
        fix.starts_with("sysctl -w net.ipv4.ip_local_reserved_ports=8080,20000-22999"),
        "{fix}"
    );

    host.write("proc/sys/net/ipv4/ip_local_reserved_ports", "8080,20000-22999\n");
    assert_eq!(doctor::host_ports(&host.view()).status, Status::Ok);

    std::fs::remove_file(host.join("proc/sys/net/ipv4/ip_local_port_range")).unwrap();
    let c = doctor::host_ports(&host.view());
    assert_eq!(c.status, Status::Warn, "{c:?}");
    assert!(c.detail.contains("cannot read"), "{c:?}");
}

#[test]
fn kvm_missing_warns_and_fails_for_the_qemu_backend() {
    let host = FakeHost::new();
    let c = doctor::kvm(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("does not exist"), "{}", c.detail);
    assert!(c.fix.unwrap().contains("modprobe kvm"));

    let view = doctor::HostView { backend: BackendChoice::Qemu, ..host.view() };
    assert_eq!(doctor::kvm(&view).status, Status::Fail);
}

#[test]
fn kvm_that_opens_but_is_not_kvm_is_reported() {
    let host = FakeHost::new();
    // /dev/null opens read-write but refuses the KVM ioctl.
    symlink("/dev/null", host.join("dev/kvm")).unwrap();
    let c = doctor::kvm(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("opens but is not KVM"), "{}", c.detail);
}

#[test]
fn kvm_of_this_machine_answers_the_api_version_ioctl() {
    let host = FakeHost::new();
    symlink("/dev/kvm", host.join("dev/kvm")).unwrap();
    let c = doctor::kvm(&host.view());
    if std::path::Path::new("/dev/kvm").exists() {
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("API version 12"), "{}", c.detail);
        assert!(c.detail.contains("probe"), "the detail says opening is not enough: {}", c.detail);
    } else {
        assert!(c.detail.contains("does not exist"), "{}", c.detail);
    }
}

#[test]
fn iommu_on_asked_but_absent_or_not_asked() {
    let grouped = FakeSysfs::new().gpu("0000:65:00.0", 0x2330).group(7);
    let host = FakeHost::new().with_sysfs(grouped);
    let c = doctor::iommu(&host.view());
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.detail, "1 IOMMU group; cmdline: intel_iommu=on iommu=pt");

    let host = FakeHost::new();
    let c = doctor::iommu(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("made no IOMMU groups"), "{}", c.detail);
    assert!(c.fix.unwrap().contains("firmware"));

    host.write("proc/cmdline", "ro quiet\n");
    let c = doctor::iommu(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("Docker only"), "{}", c.detail);
    assert!(c.fix.unwrap().contains("intel_iommu=on"));
    let view = doctor::HostView { backend: BackendChoice::Qemu, ..host.view() };
    assert_eq!(doctor::iommu(&view).status, Status::Fail);
}

#[test]
fn vfio_modules_loaded_built_in_or_missing() {
    let host = FakeHost::new().with_sysfs(FakeSysfs::new().module("vfio").module("vfio_pci"));
    let c = doctor::vfio_modules(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert_eq!(c.detail, "not loaded: vfio_iommu_type1");
    assert!(c.fix.unwrap().contains("modprobe vfio-pci"));

    host.write(
        "lib/modules/6.1.0-test-amd64/modules.builtin",
        "kernel/drivers/vfio/vfio_iommu_type1.ko\nkernel/drivers/vfio/pci/vfio-pci-core.ko\n",
    );
    let c = doctor::vfio_modules(&host.view());
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.detail, "loaded: vfio, vfio_pci, vfio_iommu_type1 (built in)");

    let bare = FakeHost::new();
    let view = doctor::HostView { backend: BackendChoice::Qemu, ..bare.view() };
    let c = doctor::vfio_modules(&view);
    assert_eq!(
        (c.status, c.detail.as_str()),
        (Status::Fail, "not loaded: vfio, vfio_pci, vfio_iommu_type1")
    );
}

fn gpu_on(driver: Option<&str>) -> FakeHost {
    let mut sysfs = FakeSysfs::new().driver_available("vfio-pci").gpu("0000:65:00.0", 0x2330);
    if let Some(driver) = driver {
        sysfs = sysfs.driver(driver);
    }
    let sysfs =
        sysfs.group(12).resettable("flr bus").function("0000:65:00.1", CLASS_AUDIO).group(12);
    FakeHost::new().with_sysfs(sysfs)
}

#[test]
fn gpu_on_nvidia_or_vfio_pci_is_ok() {
    let host = gpu_on(Some("nvidia"));
    let checks = doctor::gpus(&host.view());
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].status, Status::Ok);
    assert_eq!(
        checks[0].detail,
        "0000:65:00.0 10de:2330 on nvidia, iommu group 12 (peers: 0000:65:00.1), slot also .1; \
         passthrough ready (vfio-pci when a VM starts); between tenants: function reset (flr bus)"
    );

    let c = &doctor::gpus(&gpu_on(Some("vfio-pci")).view())[0];
    assert_eq!(c.status, Status::Ok);
    assert!(
        c.detail.contains("on vfio-pci") && c.detail.contains("(ready for a VM)"),
        "{}",
        c.detail
    );
}

#[test]
fn a_gpu_without_a_safe_reset_warns_that_tenants_share_its_state() {
    let sysfs = FakeSysfs::new()
        .driver_available("vfio-pci")
        .gpu("0000:65:00.0", 0x2330)
        .driver("nvidia")
        .group(12)
        .function("0000:65:00.1", CLASS_AUDIO)
        .group(12);
    let c = &doctor::gpus(&FakeHost::new().with_sysfs(sysfs).view())[0];
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.ends_with("the GPU's state is not cleared between tenants"), "{}", c.detail);
    assert!(c.fix.as_deref().unwrap().contains("reset_subordinate"));
}

#[test]
fn gpu_on_nouveau_fails_and_unbound_warns() {
    let c = &doctor::gpus(&gpu_on(Some("nouveau")).view())[0];
    assert_eq!(c.status, Status::Fail);
    assert!(c.fix.as_deref().unwrap().contains("blacklist nouveau"));

    let c = &doctor::gpus(&gpu_on(None).view())[0];
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("on none"), "{}", c.detail);
}

#[test]
fn gpus_that_cannot_be_passed_through_say_why() {
    // No IOMMU group: Docker only.
    let host =
        FakeHost::new().with_sysfs(FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("nvidia"));
    let c = &doctor::gpus(&host.view())[0];
    assert_eq!(c.status, Status::Warn);
    assert!(
        c.detail.ends_with("no iommu group; no passthrough: the IOMMU is off (Docker only)"),
        "{}",
        c.detail
    );

    // A NIC on its driver shares the group.
    let sysfs = FakeSysfs::new()
        .gpu("0000:65:00.0", 0x2330)
        .driver("nvidia")
        .group(12)
        .device("0000:66:00.0", 0x8086, 0x1593, CLASS_ETHERNET)
        .driver("ice")
        .group(12);
    let host = FakeHost::new().with_sysfs(sysfs);
    let c = &doctor::gpus(&host.view())[0];
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("(peers: 0000:66:00.0)"), "{}", c.detail);
    assert!(
        c.detail.contains("no passthrough now: 0000:66:00.0 shares the IOMMU group"),
        "{}",
        c.detail
    );

    // A process holds the GPU's device node.
    let host = gpu_on(Some("nvidia"));
    std::fs::create_dir_all(host.join("proc/31/fd")).unwrap();
    host.write("proc/31/comm", "nvidia-persistenced\n");
    symlink("/dev/nvidia0", host.join("proc/31/fd/4")).unwrap();
    let c = &doctor::gpus(&host.view())[0];
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("in use on the host by nvidia-persistenced (pid 31"), "{}", c.detail);
}

#[test]
fn a_host_without_the_vfio_pci_driver_says_so() {
    let sysfs = FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("nvidia").group(12);
    let c = &doctor::gpus(&FakeHost::new().with_sysfs(sysfs).view())[0];
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.ends_with("the vfio-pci driver is not loaded; run `modprobe vfio-pci` (install.sh loads it at boot)"), "{}", c.detail);
}

#[test]
fn no_gpu_warns_docker_or_vm_without_gpu() {
    let host = FakeHost::new();
    let checks = doctor::gpus(&host.view());
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].status, Status::Warn);
    assert!(checks[0].detail.contains("Docker/VM without GPU only"), "{}", checks[0].detail);
}

#[test]
fn a_listed_address_that_is_not_a_gpu_fails() {
    let sysfs = FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("nvidia").device(
        "0000:17:00.0",
        0x8086,
        0x1593,
        CLASS_ETHERNET,
    );
    let host = FakeHost::new().with_sysfs(sysfs);
    let only = vec!["0000:17:00.0".parse().unwrap(), "0000:65:00.0".parse().unwrap()];
    let view = doctor::HostView { gpu_pci_addrs: Some(only), ..host.view() };
    let checks = doctor::gpus(&view);
    let summary: Vec<(Status, &str)> =
        checks.iter().map(|c| (c.status, c.detail.as_str())).collect();
    assert_eq!(
        summary[0],
        (Status::Fail, "0000:17:00.0: vendor 8086 class 020000 is not an NVIDIA GPU")
    );
    assert_eq!(checks[0].fix.as_deref(), Some("fix QUDATA_GPU_PCI_ADDRS"));
    assert_eq!(summary[1].0, Status::Warn, "no IOMMU group in this tree: {}", summary[1].1);
    assert_eq!(checks.len(), 2);
}
