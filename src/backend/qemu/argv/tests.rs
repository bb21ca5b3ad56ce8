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
        nic: Some(NicPlan { mac: "52:54:00:d5:00:02".into(), tap_fds: vec![5], vhost_fds: vec![] }),
        qmp_socket: "/run/qudata/qmp/abc.sock".into(),
        qmp_fd: Some(7),
        pidfile: "/run/qudata/abc/qemu.pid".into(),
        serial_log: format!("{vm}/serial.log").into(),
        gpus: vec![],
        topology: Topology::unplaced(2, 2048),
        disk_io: DiskIo { direct: true, aio: crate::backend::qemu::diskio::Aio::IoUring },
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[rustfmt::skip]
fn common(accel: &str, cpu: &str) -> Vec<String> {
    let machine = format!("q35,accel={accel},memory-backend=mem0");
    strings(&[
        "-name", "qudata-abc",
        "-machine", &machine,
        "-cpu", cpu,
        "-smp", "2,sockets=1,cores=2,threads=1",
        "-m", "2048M",
        "-object", "memory-backend-memfd,id=mem0,size=2048M",
        "-object", "iothread,id=io0",
        "-nodefaults",
        "-no-user-config",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-display", "none",
        "-S",
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive", "if=pflash,format=raw,unit=1,file=/var/lib/qudata/vms/abc/OVMF_VARS.fd",
        "-drive", "if=none,id=disk0,format=qcow2,file=/var/lib/qudata/vms/abc/disk.qcow2,cache=none,aio=io_uring,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0,iothread=io0,bootindex=1",
        "-drive", "if=none,id=seed0,format=raw,readonly=on,file=/var/lib/qudata/vms/abc/seed.img",
        "-device", "virtio-blk-pci,drive=seed0",
        "-netdev", "tap,id=net0,fd=5",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:d5:00:02,romfile=",
        "-device", "virtio-rng-pci",
        "-device", "pvpanic",
        "-chardev", "socket,id=qmp,fd=7,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", "/run/qudata/abc/qemu.pid",
        "-chardev", "file,id=serial0,path=/var/lib/qudata/vms/abc/serial.log,append=on",
        "-serial", "chardev:serial0",
    ])
}

#[test]
fn tcg_without_gpu() {
    assert_eq!(qemu_argv(&plan(Accel::Tcg)), common("tcg", "max"));
}

/// The pair of arguments after `flag` (the first one).
fn value_of(argv: &[String], flag: &str, containing: &str) -> String {
    let at = argv.windows(2).find(|w| w[0] == flag && w[1].contains(containing));
    at.map(|w| w[1].clone()).unwrap_or_default()
}

#[test]
fn a_multi_queue_nic_with_vhost_gets_every_descriptor() {
    let mut p = plan(Accel::Kvm);
    p.nic = Some(NicPlan {
        mac: "52:54:00:d5:00:09".into(),
        tap_fds: vec![10, 11, 12, 13],
        vhost_fds: vec![14, 15, 16, 17],
    });
    let argv = qemu_argv(&p);
    assert_eq!(
        value_of(&argv, "-netdev", "tap"),
        "tap,id=net0,fds=10:11:12:13,vhost=on,vhostfds=14:15:16:17"
    );
    assert_eq!(
        value_of(&argv, "-device", "virtio-net"),
        "virtio-net-pci,netdev=net0,mac=52:54:00:d5:00:09,romfile=,mq=on,vectors=10"
    );
    p.nic.as_mut().unwrap().tap_fds.truncate(1);
    p.nic.as_mut().unwrap().vhost_fds.truncate(1);
    assert_eq!(value_of(&qemu_argv(&p), "-netdev", "tap"), "tap,id=net0,fd=10,vhost=on,vhostfd=14");
}

#[test]
fn no_nic_means_no_network_device() {
    let mut p = plan(Accel::Tcg);
    p.nic = None;
    let argv = qemu_argv(&p);
    assert!(!argv.iter().any(|a| a == "-netdev" || a.contains("virtio-net")), "{argv:?}");
    assert!(!argv.iter().any(|a| a.contains("user,") || a.contains("hostfwd")), "never slirp");
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn gpu(functions: &[&str], bar_bytes: u64) -> GpuPassthrough {
    GpuPassthrough { functions: strings(functions), bar_bytes }
}

/// The devices of GPU `index` (its root port, then its functions), as the argv has them.
fn gpu_devices(index: usize, functions: &[&str]) -> Vec<String> {
    let n = index + 1;
    let mut out = strings(&[
        "-device",
        &format!("pcie-root-port,id=gpu{index},bus=pcie.0,chassis={n},slot={n}"),
    ]);
    for (f, host) in functions.iter().enumerate() {
        let multi = if f == 0 { ",multifunction=on" } else { "" };
        out.push("-device".into());
        out.push(format!("vfio-pci,host={host},bus=gpu{index},addr=00.{f}{multi}"));
    }
    out
}

/// `common` with the CPU's host-phys-bits and the aperture of `mib` MiB.
fn with_gpus(accel: &str, cpu: &str, mib: u64) -> Vec<String> {
    let mut out = common(accel, &format!("{cpu},host-phys-bits=on"));
    out.push("-fw_cfg".into());
    out.push(format!("name=opt/ovmf/X-PciMmio64Mb,string={mib}"));
    out
}

#[rustfmt::skip]
#[test]
fn kvm_with_one_h100() {
    let mut p = plan(Accel::Kvm);
    p.gpus = vec![gpu(&["0000:65:00.0"], 128 * GIB + 32 * MIB)];
    let mut expected = common("kvm", "host,host-phys-bits=on");
    expected.extend(strings(&[
        // 128 GiB + 32 MiB needs a 256 GiB root-port window; doubled: 512 GiB.
        "-fw_cfg", "name=opt/ovmf/X-PciMmio64Mb,string=524288",
        "-device", "pcie-root-port,id=gpu0,bus=pcie.0,chassis=1,slot=1",
        "-device", "vfio-pci,host=0000:65:00.0,bus=gpu0,addr=00.0,multifunction=on",
    ]));
    assert_eq!(qemu_argv(&p), expected);
}

#[test]
fn kvm_with_a_gpu_and_its_audio_function_in_one_slot() {
    let mut p = plan(Accel::Kvm);
    let functions = ["0000:b3:00.0", "0000:b3:00.1"];
    p.gpus = vec![gpu(&functions, 32 * GIB + 32 * MIB)];
    // 64 GiB window, doubled.
    let mut expected = with_gpus("kvm", "host", 131072);
    expected.extend(gpu_devices(0, &functions));
    assert_eq!(qemu_argv(&p), expected);
}

#[test]
fn kvm_with_two_multifunction_gpus() {
    let mut p = plan(Accel::Kvm);
    let first = ["0000:65:00.0", "0000:65:00.1"];
    let second = ["0000:b3:00.0", "0000:b3:00.1", "0000:b3:00.2"];
    p.gpus = vec![gpu(&first, 32 * GIB + 16 * MIB), gpu(&second, 16 * GIB)];
    // 64 GiB + 16 GiB of windows round to 128 GiB, doubled.
    let mut expected = with_gpus("kvm", "host", 262144);
    expected.extend(gpu_devices(0, &first));
    expected.extend(gpu_devices(1, &second));
    assert_eq!(qemu_argv(&p), expected);
    // Spelled out once, so the helper above cannot hide a mistake.
    let argv = qemu_argv(&p);
    let tail: Vec<&str> = argv[argv.len() - 4..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "-device",
            "vfio-pci,host=0000:b3:00.1,bus=gpu1,addr=00.1",
            "-device",
            "vfio-pci,host=0000:b3:00.2,bus=gpu1,addr=00.2"
        ]
    );
}

#[test]
fn kvm_with_eight_h100s() {
    let mut p = plan(Accel::Kvm);
    let hosts = [
        "0000:18:00.0",
        "0000:2a:00.0",
        "0000:3a:00.0",
        "0000:5d:00.0",
        "0000:9a:00.0",
        "0000:ab:00.0",
        "0000:ba:00.0",
        "0000:db:00.0",
    ];
    p.gpus = hosts.iter().map(|h| gpu(&[h], 128 * GIB + 32 * MIB)).collect();
    // 8 × 256 GiB = 2 TiB, doubled: 4 TiB.
    let mut expected = with_gpus("kvm", "host", 4 << 20);
    for (i, h) in hosts.iter().enumerate() {
        expected.extend(gpu_devices(i, &[h]));
    }
    assert_eq!(qemu_argv(&p), expected);
}

#[test]
fn tcg_with_a_gpu_keeps_the_max_cpu() {
    let mut p = plan(Accel::Tcg);
    p.gpus = vec![gpu(&["0000:65:00.0"], 0)];
    let mut expected = with_gpus("tcg", "max", 32 << 10);
    expected.extend(gpu_devices(0, &["0000:65:00.0"]));
    assert_eq!(qemu_argv(&p), expected);
}

#[test]
fn commas_in_option_paths_are_doubled() {
    let mut p = plan(Accel::Tcg);
    p.overlay = "/data/a,b/disk.qcow2".into();
    let argv = qemu_argv(&p);
    let drive = "if=none,id=disk0,format=qcow2,file=/data/a,,b/disk.qcow2,cache=none,aio=io_uring,\
                 discard=unmap";
    assert!(argv.contains(&drive.to_owned()), "{argv:?}");
}

#[test]
fn mmio_window_rounds_each_gpu_then_the_total_and_doubles() {
    let g = |bar_bytes| gpu(&[], bar_bytes);
    assert_eq!(mmio64_window_mib(&[]), None);
    assert_eq!(mmio64_window_mib(&[g(0)]), Some(32 << 10), "never below OVMF's default");
    assert_eq!(mmio64_window_mib(&[g(32 * GIB)]), Some(64 << 10));
    assert_eq!(mmio64_window_mib(&[g(32 * GIB), g(1)]), Some(128 << 10));
    assert_eq!(mmio64_window_mib(&[g(u64::MAX)]), Some(u64::MAX >> 20), "saturates");
}

/// The 8-GPU VM of `topology::tests` on two host nodes, 1 GiB pages.
fn two_node_topology() -> Topology {
    use crate::backend::qemu::topology::GuestNode;
    let node = |i: u32, pin: Vec<u32>| GuestNode {
        vcpus: (i * 8..i * 8 + 8).collect(),
        memory_mib: 65536,
        host_node: Some(i),
        pin,
        prealloc_threads: Some(14),
    };
    Topology {
        sockets: 2,
        cores: 8,
        threads: 1,
        nodes: vec![node(0, vec![1, 2, 3]), node(1, vec![9, 10, 11])],
        backing: Backing::HugePages { page_kib: 1 << 20 },
        io_cpus: vec![0, 8],
    }
}

/// The arguments from `-machine` to the I/O thread.
fn machine_to_iothread(argv: &[String]) -> Vec<String> {
    let start = argv.iter().position(|a| a == "-machine").unwrap();
    let end = argv.iter().position(|a| a == "iothread,id=io0").unwrap();
    argv[start..=end].to_vec()
}

#[rustfmt::skip]
#[test]
fn two_host_nodes_make_two_guest_nodes_on_bound_huge_pages() {
    let mut p = plan(Accel::Kvm);
    p.vcpus = 16;
    p.memory_mib = 131072;
    p.topology = two_node_topology();
    p.gpus = vec![gpu(&["0000:18:00.0"], 0), gpu(&["0000:9a:00.0"], 0)];
    assert_eq!(machine_to_iothread(&qemu_argv(&p)), strings(&[
        "-machine", "q35,accel=kvm",
        "-cpu", "host,host-phys-bits=on",
        "-smp", "16,sockets=2,cores=8,threads=1",
        "-m", "131072M",
        "-object", "memory-backend-memfd,id=mem0,size=65536M,hugetlb=on,hugetlbsize=1G,host-nodes=0,policy=bind,prealloc=on,prealloc-threads=14",
        "-numa", "node,nodeid=0,cpus=0-7,memdev=mem0",
        "-object", "memory-backend-memfd,id=mem1,size=65536M,hugetlb=on,hugetlbsize=1G,host-nodes=1,policy=bind,prealloc=on,prealloc-threads=14",
        "-numa", "node,nodeid=1,cpus=8-15,memdev=mem1",
        "-object", "iothread,id=io0",
    ]));
}

#[rustfmt::skip]
#[test]
fn one_placed_node_on_2_mib_pages_is_the_machines_memory() {
    let mut p = plan(Accel::Kvm);
    let mut t = two_node_topology();
    t.nodes.truncate(1);
    t.nodes[0].vcpus = vec![0, 1];
    t.nodes[0].memory_mib = 2048;
    (t.sockets, t.cores) = (1, 2);
    t.backing = Backing::HugePages { page_kib: 2048 };
    p.topology = t;
    assert_eq!(machine_to_iothread(&qemu_argv(&p)), strings(&[
        "-machine", "q35,accel=kvm,memory-backend=mem0",
        "-cpu", "host",
        "-smp", "2,sockets=1,cores=2,threads=1",
        "-m", "2048M",
        "-object", "memory-backend-memfd,id=mem0,size=2048M,hugetlb=on,hugetlbsize=2M,host-nodes=0,policy=bind,prealloc=on,prealloc-threads=14",
        "-object", "iothread,id=io0",
    ]));
}

#[test]
fn a_cached_overlay_where_o_direct_fails() {
    let mut p = plan(Accel::Tcg);
    p.disk_io = DiskIo::CACHED;
    let argv = qemu_argv(&p);
    assert_eq!(
        value_of(&argv, "-drive", "id=disk0"),
        "if=none,id=disk0,format=qcow2,file=/var/lib/qudata/vms/abc/disk.qcow2,cache=writeback,\
         aio=threads,discard=unmap"
    );
    // The seed stays a plain read-only drive.
    assert_eq!(
        value_of(&argv, "-drive", "id=seed0"),
        "if=none,id=seed0,format=raw,readonly=on,file=/var/lib/qudata/vms/abc/seed.img"
    );
}

#[test]
fn without_a_descriptor_qemu_binds_its_monitor_itself() {
    let plan = VmPlan { qmp_fd: None, ..plan(Accel::Tcg) };
    let argv = qemu_argv(&plan);
    assert_eq!(
        value_of(&argv, "-qmp", "unix:"),
        "unix:/run/qudata/qmp/abc.sock,server=on,wait=off"
    );
    assert!(!argv.iter().any(|a| a == "-mon"));
}
