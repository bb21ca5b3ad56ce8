use super::*;

fn plan(accel: Accel) -> VmPlan {
    let vm = "/var/lib/qudata/vms/abc";
    VmPlan {
        id: "abc".into(),
        accel,
        vcpus: 2,
        memory_mib: 2048,
        ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        ovmf_vars: format!("{vm}/OVMF_VARS.fd").into(),
        overlay: format!("{vm}/disk.qcow2").into(),
        seed: format!("{vm}/seed.img").into(),
        ports: vec![(10022, 22), (10888, 8888)],
        qmp_socket: "/run/qudata/abc/qmp.sock".into(),
        pidfile: "/run/qudata/abc/qemu.pid".into(),
        serial_log: format!("{vm}/serial.log").into(),
        gpus: vec![],
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[rustfmt::skip]
fn common(accel: &str, cpu: &str) -> Vec<String> {
    let machine = format!("q35,accel={accel}");
    strings(&[
        "-name", "qudata-abc",
        "-machine", &machine,
        "-cpu", cpu,
        "-smp", "2",
        "-m", "2048M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-S",
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive", "if=pflash,format=raw,unit=1,file=/var/lib/qudata/vms/abc/OVMF_VARS.fd",
        "-drive", "if=virtio,format=qcow2,file=/var/lib/qudata/vms/abc/disk.qcow2",
        "-drive", "if=virtio,format=raw,readonly=on,file=/var/lib/qudata/vms/abc/seed.img",
        "-netdev",
        "user,id=net0,hostfwd=tcp:127.0.0.1:10022-:22,hostfwd=tcp:127.0.0.1:10888-:8888",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",
        "-qmp", "unix:/run/qudata/abc/qmp.sock,server=on,wait=off",
        "-pidfile", "/run/qudata/abc/qemu.pid",
        "-serial", "file:/var/lib/qudata/vms/abc/serial.log",
    ])
}

#[test]
fn tcg_without_gpu() {
    assert_eq!(qemu_argv(&plan(Accel::Tcg)), common("tcg", "max"));
}

#[rustfmt::skip]
#[test]
fn kvm_with_two_multifunction_gpus() {
    let mut p = plan(Accel::Kvm);
    p.gpus = vec![
        GpuPassthrough {
            functions: vec!["0000:65:00.0".into(), "0000:65:00.1".into()],
            bar_bytes: (32 << 30) + (16 << 20),
        },
        GpuPassthrough {
            functions: vec![
                "0000:b3:00.0".into(),
                "0000:b3:00.1".into(),
                "0000:b3:00.2".into(),
            ],
            bar_bytes: 16 << 30,
        },
    ];
    let mut expected = common("kvm", "host");
    expected.extend(strings(&[
        // 48 GiB + 16 MiB rounds up to 64 GiB.
        "-global", "q35-pcihost.pci-hole64-size=68719476736",
        "-device", "pcie-root-port,id=gpu0,bus=pcie.0,chassis=1,slot=1",
        "-device", "vfio-pci,host=0000:65:00.0,bus=gpu0,addr=00.0,multifunction=on",
        "-device", "vfio-pci,host=0000:65:00.1,bus=gpu0,addr=00.1",
        "-device", "pcie-root-port,id=gpu1,bus=pcie.0,chassis=2,slot=2",
        "-device", "vfio-pci,host=0000:b3:00.0,bus=gpu1,addr=00.0,multifunction=on",
        "-device", "vfio-pci,host=0000:b3:00.1,bus=gpu1,addr=00.1",
        "-device", "vfio-pci,host=0000:b3:00.2,bus=gpu1,addr=00.2",
    ]));
    assert_eq!(qemu_argv(&p), expected);
}

#[test]
fn commas_in_option_paths_are_doubled() {
    let mut p = plan(Accel::Tcg);
    p.overlay = "/data/a,b/disk.qcow2".into();
    p.ports.clear();
    let argv = qemu_argv(&p);
    assert!(argv.contains(&"if=virtio,format=qcow2,file=/data/a,,b/disk.qcow2".to_owned()));
    assert!(argv.contains(&"user,id=net0".to_owned()));
}

#[test]
fn mmio_window_is_a_power_of_two_covering_every_bar() {
    let gpu = |bar_bytes| GpuPassthrough { functions: vec![], bar_bytes };
    assert_eq!(mmio64_window(&[]), None);
    assert_eq!(mmio64_window(&[gpu(32 << 30)]), Some(32 << 30));
    assert_eq!(mmio64_window(&[gpu(32 << 30), gpu(1)]), Some(64 << 30));
    assert_eq!(mmio64_window(&[gpu(0)]), Some(1));
}
