//! qemu, qemu-img, ovmf, frpc, docker and data dir checks against fake hosts, and a host
//! where everything is ready.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use qudata_agent::backend::qemu::accel::{Accel, Decision};
use qudata_agent::config::{AccelChoice, BackendChoice};
use qudata_agent::doctor::{self, AccelView, HostView, Status};

use crate::support::host::FakeHost;
use crate::support::sysfs::{CLASS_AUDIO, FakeSysfs};
use crate::support::wait::wait_until_blocking;

#[test]
fn qemu_on_path_reports_its_version() {
    let host = FakeHost::new();
    let path =
        host.program("qemu-system-x86_64", "echo 'QEMU emulator version 9.2.0'; echo '(c) x'");
    let c = doctor::qemu(&host.view());
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.detail, format!("QEMU emulator version 9.2.0 ({})", path.display()));
}

#[test]
fn qemu_missing_warns_and_fails_for_the_qemu_backend() {
    let host = FakeHost::new();
    let c = doctor::qemu_img(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert_eq!(c.detail, "qemu-img is not on PATH");
    assert_eq!(c.fix.as_deref(), Some("apt-get install qemu-utils"));
    let view = HostView { backend: BackendChoice::Qemu, ..host.view() };
    assert_eq!(doctor::qemu(&view).status, Status::Fail);
}

#[test]
fn the_vm_network_tools_are_named_by_package() {
    let host = FakeHost::new();
    host.program("ip", "echo 1.0");
    let c = doctor::vm_network(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert_eq!(c.detail, "missing: nftables, dnsmasq-base, conntrack, iproute2");
    assert_eq!(c.fix.as_deref(), Some("apt-get install nftables dnsmasq-base conntrack iproute2"));
    let view = HostView { backend: BackendChoice::Qemu, ..host.view() };
    assert_eq!(doctor::vm_network(&view).status, Status::Fail);
    for tool in ["nft", "dnsmasq", "conntrack", "tc"] {
        host.program(tool, "echo 1.0");
    }
    assert_eq!(doctor::vm_network(&host.view()).status, Status::Ok, "with /dev/net/tun here");
}

#[test]
fn a_hung_or_broken_qemu_is_reported_not_waited_for() {
    let host = FakeHost::new();
    host.program("qemu-img", "exec sleep 600");
    let view = HostView { command_timeout: Duration::from_millis(300), ..host.view() };
    let c = doctor::qemu_img(&view);
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("gave no answer"), "{}", c.detail);

    host.program("qemu-img", "exit 3");
    let c = doctor::qemu_img(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("exited with"), "{}", c.detail);
}

#[test]
fn ovmf_pairs_4m_or_classic_and_half_pairs() {
    let host = FakeHost::new();
    let c = doctor::ovmf(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.starts_with("no OVMF firmware in"), "{}", c.detail);
    assert_eq!(c.fix.as_deref(), Some("apt-get install ovmf"));

    host.write("ovmf/OVMF_CODE_4M.fd", "code");
    let c = doctor::ovmf(&host.view());
    assert!(c.detail.ends_with("holds OVMF_CODE_4M.fd but no code + vars pair"), "{}", c.detail);

    host.write("ovmf/OVMF_CODE.fd", "code");
    host.write("ovmf/OVMF_VARS.fd", "vars");
    let c = doctor::ovmf(&host.view());
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.detail, pair(&host, "OVMF_CODE.fd", "OVMF_VARS.fd"));

    host.write("ovmf/OVMF_VARS_4M.fd", "vars");
    let c = doctor::ovmf(&host.view());
    assert_eq!(c.detail, pair(&host, "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), "4M wins");
}

fn pair(host: &FakeHost, code: &str, vars: &str) -> String {
    let ovmf = host.join("ovmf");
    format!("{} + {}", ovmf.join(code).display(), ovmf.join(vars).display())
}

#[test]
fn frpc_by_name_by_path_or_missing() {
    let host = FakeHost::new();
    let c = doctor::frpc(&host.view());
    assert_eq!(c.status, Status::Fail);
    assert!(c.fix.unwrap().contains("QUDATA_FRPC_BINARY"));

    let path = host.program("frpc", "echo 0.61.0");
    let c = doctor::frpc(&host.view());
    assert_eq!(
        (c.status, c.detail.clone()),
        (Status::Ok, format!("frpc 0.61.0 ({})", path.display()))
    );

    let elsewhere = host.join("opt-frpc");
    fs::rename(&path, &elsewhere).unwrap();
    let view = HostView { frpc_binary: elsewhere.clone(), ..host.view() };
    assert_eq!(doctor::frpc(&view).status, Status::Ok, "an absolute path needs no PATH");
    fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(doctor::frpc(&view).status, Status::Fail, "not executable");
}

#[test]
fn docker_socket_listening_refusing_or_missing() {
    let host = FakeHost::new();
    let c = doctor::docker(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.contains("does not exist"), "{}", c.detail);
    let view = HostView { backend: BackendChoice::Docker, ..host.view() };
    assert_eq!(doctor::docker(&view).status, Status::Fail);

    let listener = UnixListener::bind(host.join("docker.sock")).unwrap();
    let c = doctor::docker(&host.view());
    assert_eq!(c.status, Status::Ok, "{c:?}");
    assert!(c.detail.ends_with("docker.sock accepts connections"), "{}", c.detail);

    drop(listener); // the socket file stays, nobody listens
    // A process another test thread is spawning may hold a copy of the listener until its
    // exec closes it (CLOEXEC), so the refusal may take a moment.
    let what = "the docker check to find nobody listening";
    let c = wait_until_blocking(what, Duration::from_secs(10), Duration::from_millis(50), || {
        let c = doctor::docker(&host.view());
        if c.status == Status::Ok { Err(format!("{c:?}")) } else { Ok(c) }
    });
    assert_eq!(c.status, Status::Warn, "{c:?}");
    assert!(c.detail.contains("cannot connect"), "{}", c.detail);
    assert_eq!(c.fix.as_deref(), Some("systemctl start docker"));
}

#[test]
fn data_dir_missing_wrong_mode_wrong_owner_or_right() {
    let host = FakeHost::new();
    let c = doctor::data_dir(&host.view());
    assert_eq!(c.status, Status::Warn);
    assert!(c.detail.ends_with("does not exist: created at first run"), "{}", c.detail);
    assert_eq!(c.fix, None);

    let dir = host.join("data");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let as_root = fs::metadata(&dir).unwrap().uid() == 0;
    let c = doctor::data_dir(&host.view());
    if as_root {
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.ends_with("has mode 0755, not 0700"), "{}", c.detail);
        assert_eq!(c.fix, Some(format!("chmod 0700 {}", dir.display())));

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let c = doctor::data_dir(&host.view());
        assert_eq!(
            (c.status, c.detail),
            (Status::Ok, format!("{}, mode 0700, owned by root", dir.display()))
        );

        std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).unwrap();
    }
    let c = doctor::data_dir(&host.view());
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail.contains("not root"), "{}", c.detail);
    assert!(c.fix.unwrap().starts_with("chown root:"));
}

#[test]
fn a_ready_host_is_all_ok_in_the_documented_order() {
    // The GPU kept on vfio-pci: a VM host with no NVIDIA driver to load (`nvml` is ok).
    let sysfs = FakeSysfs::new()
        .gpu("0000:65:00.0", 0x2330)
        .driver("vfio-pci")
        .group(12)
        .resettable("flr")
        .function("0000:65:00.1", CLASS_AUDIO)
        .group(12)
        .module("vfio")
        .module("vfio_pci")
        .module("vfio_iommu_type1")
        // Loading vfio_pci registers its driver.
        .driver_available("vfio-pci");
    let host = FakeHost::new().with_sysfs(sysfs);
    symlink_kvm(&host);
    for name in
        ["qemu-system-x86_64", "qemu-img", "frpc", "nft", "dnsmasq", "conntrack", "ip", "tc"]
    {
        host.program(name, "echo 1.0");
    }
    host.write("ovmf/OVMF_CODE_4M.fd", "code");
    host.write("ovmf/OVMF_VARS_4M.fd", "vars");
    host.write("proc/sys/net/ipv4/ip_local_port_range", "32768\t60999\n");
    let _docker = UnixListener::bind(host.join("docker.sock")).unwrap();
    fs::create_dir(host.join("data")).unwrap();
    fs::set_permissions(host.join("data"), fs::Permissions::from_mode(0o700)).unwrap();
    let frp = r#"{"server_addr":"frp.example","server_port":7000,"token":"t0ken-t0ken"}"#;
    host.write("data/frp.json", frp);
    let kvm_works = doctor::kvm(&host.view()).status == Status::Ok;
    let as_root = fs::metadata(host.join("data")).unwrap().uid() == 0;

    // The accelerator decision is made before the checks (a probe guest): KVM here.
    let decision = Decision { accel: Accel::Kvm, reason: "the probe guest ran".into() };
    let accel = AccelView::Decided { decision, choice: AccelChoice::Auto };
    let checks = doctor::run_all(&HostView { accel, ..host.view() });
    let names: Vec<&str> = checks.iter().map(|c| c.check).collect();
    assert_eq!(names, doctor::CHECKS);
    for c in &checks {
        let expected_ok = match c.check {
            "kvm" => kvm_works,
            "datadir" => as_root,
            _ => true,
        };
        assert_eq!(c.status == Status::Ok, expected_ok, "{c:?}");
    }
    assert_eq!(doctor::any_failed(&checks), !as_root);
}

/// The real `/dev/kvm` where this machine has one (the ioctl needs the real device).
fn symlink_kvm(host: &FakeHost) {
    std::os::unix::fs::symlink("/dev/kvm", host.join("dev/kvm")).unwrap();
}
