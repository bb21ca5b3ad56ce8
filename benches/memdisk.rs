//! Memory and disk figures (issue "GPUs inside the VM", items 4 and 5): a benchmark, not a
//! test; it prints numbers.
//!
//! `cargo bench --bench memdisk` measures, with QEMU under TCG:
//! - QEMU's start (spawn → its monitor greets) with a 4 GiB memfd-backed guest: without
//!   preallocation, and preallocated by 1 thread and by one per host CPU;
//! - inside the CI guest, the overlay's throughput with the agent's disk options (virtio-blk
//!   on an iothread, cache=none, io_uring or native, discard=unmap) against the old ones
//!   (QEMU's defaults: writeback cache, aio=threads, the main loop): busybox `dd` with
//!   O_DIRECT, sequential 1 MiB writes and reads, and 4 KiB writes per second, alternating.
//!
//! `QUDATA_BENCH_ROUNDS` sets the rounds (default 3).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qudata_agent::backend::qemu::accel::Accel;
use qudata_agent::backend::qemu::argv::{VmPlan, qemu_argv};
use qudata_agent::backend::qemu::qmp::Qmp;
use qudata_agent::backend::qemu::topology::Topology;
use qudata_agent::backend::qemu::{disk, diskio, seed};
use support::agent::free_port;
use support::vm::{BOOT, ci_guest_image, openssh, ssh_keygen};
use support::wait::wait_until;

const QEMU: &str = "qemu-system-x86_64";

fn rounds() -> usize {
    std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A QEMU of this bench, killed and reaped however it ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(argv: &[String], dir: &Path) -> Qemu {
    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let child = Command::new(QEMU)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Qemu(child)
}

async fn monitor(socket: &Path) -> Qmp {
    let limit = Duration::from_secs(120);
    wait_until("QEMU's monitor", limit, Duration::from_millis(5), async || {
        Qmp::connect(socket, limit).await.map_err(|e| e.to_string())
    })
    .await
}

/// A VM of the CI guest in `dir` (the seed carries `public_key`).
async fn plan(dir: &Path, vcpus: u32, memory_mib: u64, public_key: &str) -> VmPlan {
    let overlay = dir.join("disk.qcow2");
    disk::create_overlay(Path::new("qemu-img"), &ci_guest_image(), &overlay, 4).await.unwrap();
    let seed_path = dir.join("seed.img");
    let content = seed::SeedContent {
        instance_id: "bench",
        hostname: "bench",
        management_public_key: public_key,
        mac: None,
    };
    seed::build_seed(&seed_path, &content).await.unwrap();
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();
    let vars = dir.join("OVMF_VARS.fd");
    disk::copy_vars(&ovmf.vars_template, &vars).unwrap();
    VmPlan {
        id: "bench".into(),
        accel: Accel::Tcg,
        vcpus,
        memory_mib,
        ovmf_code: ovmf.code,
        ovmf_vars: vars,
        overlay,
        seed: seed_path,
        nic: None,
        qmp_socket: dir.join("qmp.sock"),
        qmp_fd: None,
        pidfile: dir.join("qemu.pid"),
        serial_log: dir.join("serial.log"),
        gpus: vec![],
        topology: Topology::unplaced(vcpus, memory_mib),
        disk_io: diskio::probe(Path::new(QEMU), dir).await,
    }
}

/// Spawn → monitor greeting of a paused 4 GiB guest, prealloc by `threads` (`None`: none).
async fn start_time(threads: Option<u32>) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut p = plan(dir.path(), 1, 4096, "ssh-ed25519 AAAA bench").await;
    p.topology.nodes[0].prealloc_threads = threads;
    let argv = qemu_argv(&p);
    let started = Instant::now();
    let _qemu = spawn(&argv, dir.path());
    let qmp = monitor(&p.qmp_socket).await;
    let took = started.elapsed().as_secs_f64();
    let _ = qmp.quit().await;
    took
}

async fn memory_figures(rounds: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let cases: [(String, Option<u32>); 3] = [
        ("no prealloc".into(), None),
        ("prealloc, 1 thread".into(), Some(1)),
        (format!("prealloc, {cpus} threads"), Some(cpus)),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (_, threads)) in cases.iter().enumerate() {
            times[i].push(start_time(*threads).await);
        }
    }
    for ((name, _), t) in cases.iter().zip(times) {
        let all: Vec<String> = t.iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "4 GiB memfd guest, spawn → QMP, {name:<22} median {:.3} s ({})",
            median(t),
            all.join(", ")
        );
    }
}

/// The disk options compared: the old ones (QEMU's defaults on the main loop), the new I/O
/// thread and submission with the host's cache (to tell the cache's share from theirs), the
/// agent's.
const VARIANTS: [&str; 3] =
    ["old: defaults, main loop", "iothread, writeback cache, same aio", "new"];

fn variant(argv: &[String], which: usize) -> Vec<String> {
    argv.iter()
        .map(|a| match which {
            0 if a.starts_with("if=none,id=disk0,") => {
                a.split(",cache=").next().unwrap().to_owned()
            }
            0 => a.replace(",iothread=io0", ""),
            1 => a.replace(",cache=none,", ",cache=writeback,"),
            _ => a.clone(),
        })
        .collect()
}

/// Seconds the guest took for a command, by its own clock (`/proc/uptime`, 10 ms).
fn timed(key: &Path, port: u16, command: &str) -> f64 {
    let script = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {command} 2>/dev/null; cut -d' ' -f1 /proc/uptime; echo $a"
    );
    let out = openssh(key, port, &script).unwrap();
    let v: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    v[0] - v[1]
}

/// (sequential write MiB/s, sequential read MiB/s, 4 KiB writes/s) in a fresh guest.
async fn disk_round(argv: &[String], p: &VmPlan, dir: &Path, key: &Path, port: u16) -> [f64; 3] {
    let _ = std::fs::remove_file(key.with_extension("known_hosts"));
    let _qemu = spawn(argv, dir);
    let qmp = monitor(&p.qmp_socket).await;
    qmp.cont().await.unwrap();
    wait_until("SSH into the guest", BOOT, Duration::from_millis(500), async || {
        openssh(key, port, "true")
    })
    .await;
    // Past the guest's own partitions (the base image is smaller than 1 GiB).
    let seq = 256;
    let write = timed(
        key,
        port,
        &format!("dd if=/dev/zero of=/dev/vda bs=1M count={seq} seek=1024 oflag=direct"),
    );
    let read = timed(
        key,
        port,
        &format!("dd if=/dev/vda of=/dev/null bs=1M count={seq} skip=1024 iflag=direct"),
    );
    let small = 2000;
    let iops = timed(
        key,
        port,
        &format!("dd if=/dev/zero of=/dev/vda bs=4k count={small} seek=786432 oflag=direct"),
    );
    let _ = qmp.quit().await;
    [seq as f64 / write, seq as f64 / read, small as f64 / iops]
}

async fn disk_figures(rounds: usize) {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "bench");
    let mut results = [Vec::new(), Vec::new(), Vec::new()];
    let mut io = String::new();
    for _ in 0..rounds {
        for (i, results) in results.iter_mut().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let p = plan(dir.path(), 1, 512, &public).await;
            io = p.disk_io.drive_options();
            let port = free_port();
            let mut argv = variant(&qemu_argv(&p), i);
            let netdev = format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22");
            argv.extend(["-netdev".into(), netdev]);
            argv.extend(["-device".into(), "virtio-net-pci,netdev=n0,romfile=".into()]);
            results.push(disk_round(&argv, &p, dir.path(), &key, port).await);
        }
    }
    for (i, r) in results.into_iter().enumerate() {
        let name = if i == 2 { format!("new: iothread, {io}") } else { VARIANTS[i].to_owned() };
        let col = |k: usize| median(r.iter().map(|x| x[k]).collect());
        println!(
            "CI guest dd O_DIRECT, {name}: write {:.1} MiB/s, read {:.1} MiB/s, 4 KiB writes {:.0}/s",
            col(0),
            col(1),
            col(2)
        );
    }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("memdisk benchmark: skipped (run it with `cargo bench --bench memdisk`)");
        return;
    }
    let rounds = rounds();
    memory_figures(rounds).await;
    disk_figures(rounds).await;
}
