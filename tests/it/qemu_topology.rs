//! A VM's planned topology on a real QEMU (TCG): its memfd-backed guest nodes as the CI guest
//! sees them, and its threads pinned as planned. The plan comes from a fixture sysfs of a
//! two-node host whose nodes are this machine's two CPUs (0 and 1).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qudata_agent::backend::qemu::accel::Accel;
use qudata_agent::backend::qemu::argv::{VmPlan, qemu_argv};
use qudata_agent::backend::qemu::layout::VmPaths;
use qudata_agent::backend::qemu::pin::{self, VcpuThread};
use qudata_agent::backend::qemu::qmp::Qmp;
use qudata_agent::backend::qemu::topology::{self, HostFacts, Reserved, Topology, VmShape};
use qudata_agent::backend::qemu::{disk, diskio, seed};

use crate::support::agent::free_port;
use crate::support::vm::{BOOT, ci_guest_image, openssh, ssh_keygen};
use crate::support::wait::wait_until;

const QEMU: &str = "qemu-system-x86_64";
const LIMIT: Duration = Duration::from_secs(30);

/// A two-node host: node 0 is CPU 0, node 1 is CPU 1 (this machine's), no huge pages.
fn two_node_sysfs(root: &Path) {
    for (node, cpu) in [(0, 0), (1, 1)] {
        let dir = root.join(format!("devices/system/node/node{node}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpulist"), format!("{cpu}\n")).unwrap();
    }
}

/// Two GPUs, one on each node, 2 vCPUs, 512 MiB, CPU 0 kept for the host: vCPU 0 on CPU 0
/// (node 0 has no other), vCPU 1 on CPU 1, QEMU's other threads on CPU 0. This machine has
/// one real node, so the memory is not bound to the fixture's nodes.
fn planned() -> Topology {
    let sysfs = tempfile::tempdir().unwrap();
    two_node_sysfs(sysfs.path());
    let facts = HostFacts::read(&qudata_agent::vfio::SysfsRoot::new(sysfs.path())).unwrap();
    let shape = VmShape { vcpus: 2, memory_mib: 512, gpu_nodes: vec![Some(0), Some(1)] };
    let mut t = topology::plan(&facts, &Reserved::Cpus(vec![0]), &shape).unwrap();
    assert_eq!((t.sockets, t.cores, t.threads), (2, 1, 1));
    assert_eq!(t.nodes.iter().map(|n| n.pin.clone()).collect::<Vec<_>>(), [vec![0], vec![1]]);
    assert_eq!(t.io_cpus, vec![0]);
    for node in &mut t.nodes {
        node.host_node = None;
    }
    t
}

/// The files of a VM booting the CI guest with `key` in its seed, in `dir`.
async fn prepare(dir: &Path, id: &str, public_key: &str) -> VmPlan {
    let layout = VmPaths::new(&dir.join("data"), &dir.join("run"), id);
    std::fs::create_dir_all(&layout.run_dir).unwrap();
    let overlay = dir.join("disk.qcow2");
    let qemu_img = disk::qemu_img_for(Path::new(QEMU));
    disk::create_overlay(&qemu_img, &ci_guest_image(), &overlay, 2).await.unwrap();
    let seed_path = dir.join("seed.img");
    let hostname = format!("qudata-{id}");
    let content = seed::SeedContent {
        instance_id: id,
        hostname: &hostname,
        management_public_key: public_key,
        mac: None,
    };
    seed::build_seed(&seed_path, &content).await.unwrap();
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();
    let vars = dir.join("OVMF_VARS.fd");
    disk::copy_vars(&ovmf.vars_template, &vars).unwrap();
    VmPlan {
        id: id.to_owned(),
        accel: Accel::Tcg,
        vcpus: 2,
        memory_mib: 512,
        ovmf_code: ovmf.code,
        ovmf_vars: vars,
        overlay,
        seed: seed_path,
        nic: None,
        // QEMU binds its monitor itself here (the agent's own socket is tested in `qemu`).
        qmp_socket: layout.legacy_qmp,
        qmp_fd: None,
        pidfile: layout.pidfile,
        serial_log: dir.join("serial.log"),
        gpus: vec![],
        topology: planned(),
        disk_io: diskio::probe(Path::new(QEMU), dir).await,
    }
}

/// A QEMU of this test, killed and reaped however the test ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `argv` paused; its monitor once it answers.
async fn start(plan: &VmPlan, argv: Vec<String>, log: &Path) -> (Qemu, Qmp) {
    let stderr = std::fs::File::create(log).unwrap();
    let child = Command::new(QEMU)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let qemu = Qemu(child);
    let socket = plan.qmp_socket.clone();
    let what = format!("QEMU's monitor (log {})", log.display());
    let qmp = wait_until(what, LIMIT, Duration::from_millis(50), async || {
        Qmp::connect(&socket, LIMIT).await.map_err(|e| e.to_string())
    })
    .await;
    (qemu, qmp)
}

/// `Cpus_allowed_list` of thread `tid` of `pid`.
fn allowed(pid: u32, tid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_owned()
}

fn tasks(pid: u32) -> Vec<u32> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_paused_qemus_threads_are_pinned_as_planned() {
    let dir = tempfile::tempdir().unwrap();
    let plan =
        prepare(dir.path(), "it-pin", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0qudata test").await;
    let (qemu, qmp) = start(&plan, qemu_argv(&plan), &dir.path().join("qemu.log")).await;
    let pid = qemu.0.id();

    let vcpus = qmp.query_vcpu_threads().await.unwrap();
    let indices: Vec<u32> = vcpus.iter().map(|v| v.index).collect();
    assert_eq!(indices, [0, 1]);
    pin::pin(Path::new("/proc"), pid, &vcpus, &plan.topology).unwrap();

    let of = |v: &VcpuThread| allowed(pid, v.tid);
    assert_eq!(vcpus.iter().map(of).collect::<Vec<_>>(), ["0", "1"]);
    let others: Vec<u32> =
        tasks(pid).into_iter().filter(|t| !vcpus.iter().any(|v| v.tid == *t)).collect();
    assert!(others.contains(&pid), "the main loop is one of them: {others:?}");
    for tid in others {
        assert_eq!(allowed(pid, tid), "0", "thread {tid} (main loop, I/O thread, workers)");
    }
    qmp.quit().await.unwrap();
}

#[tokio::test]
async fn the_guest_sees_its_planned_numa_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(dir.path(), "topology");
    let plan = prepare(dir.path(), "it-numa", &public).await;
    let port = free_port();
    let mut argv = qemu_argv(&plan);
    // The test's own way in: QEMU's user network, restricted (the guest reaches nothing), with
    // SSH forwarded from 127.0.0.1 only. (The agent's VMs use a tap on its bridge.)
    let netdev = format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22");
    argv.extend([
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-pci,netdev=n0,romfile=".into(),
    ]);
    let memory = argv.iter().filter(|a| a.starts_with("memory-backend-memfd,")).count();
    assert_eq!(memory, 2, "{argv:?}");
    let (_qemu, qmp) = start(&plan, argv, &dir.path().join("qemu.log")).await;
    let vcpus = qmp.query_vcpu_threads().await.unwrap();
    pin::pin(Path::new("/proc"), _qemu.0.id(), &vcpus, &plan.topology).unwrap();
    qmp.cont().await.unwrap();

    let look = "ls /sys/devices/system/node; cat /sys/devices/system/node/node*/cpulist; \
                grep MemTotal /sys/devices/system/node/node*/meminfo";
    let seen =
        wait_until("an SSH answer from the guest", BOOT, Duration::from_secs(1), async || {
            openssh(&key, port, look)
        })
        .await;
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.contains(&"node0") && lines.contains(&"node1"), "{seen}");
    assert!(!seen.contains("node2"), "{seen}");
    // Node 0 has vCPU 0, node 1 vCPU 1, each about half the memory (less what the kernel keeps).
    let cpulists: Vec<&str> = lines.iter().copied().filter(|l| *l == "0" || *l == "1").collect();
    assert_eq!(cpulists, ["0", "1"], "{seen}");
    let totals: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains("MemTotal"))
        .map(|l| l.split_whitespace().rev().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(totals.len(), 2, "{seen}");
    for kib in totals {
        assert!((128 << 10..=256 << 10).contains(&kib), "a node of about 256 MiB: {seen}");
    }
    qmp.quit().await.unwrap();
}
