//! VM figures (issue "QEMU VM instances", item 8): a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench vm` measures, with the CI guest under TCG:
//! - `POST /instances` → `running` through the agent, against the same QEMU command line started
//!   by hand until an SSH login works, alternating, as a ratio (the agent's overhead);
//! - creating the qcow2 overlay on a 20 GiB sparse base image.
//!
//! `QUDATA_BENCH_ROUNDS` sets the number of alternating rounds (default 3).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qudata_agent::backend::qemu::disk;
use support::agent::{Api, Dirs, local_secret};
use support::vm::{
    BOOT, ci_guest_image, create_running, fresh_agent, openssh, qemu_pids, small_vm, ssh_keygen,
    wait_gone,
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One create through the agent: the time to `running`, and the QEMU command line it ran.
async fn through_agent(api: &Api, dirs: &Dirs) -> (Duration, Vec<String>) {
    let started = Instant::now();
    let id = create_running(api, &small_vm()).await;
    let took = started.elapsed();
    let pid = qemu_pids(&id)[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(dirs, &id, Duration::from_secs(60)).await;
    (took, argv)
}

/// The agent's command line with its paths moved into `dir`, without `-S` (nothing will send
/// `cont`), started by hand; the time until `ssh` logs in with `key`.
fn by_hand(
    agent_argv: &[String],
    agent_vm_dir: &str,
    agent_run_dir: &str,
    dir: &Path,
    key: &Path,
    port: u16,
) -> Duration {
    let dir_s = dir.display().to_string();
    let argv: Vec<String> = agent_argv[1..]
        .iter()
        .filter(|a| *a != "-S")
        .map(|a| a.replace(agent_vm_dir, &dir_s).replace(agent_run_dir, &dir_s))
        .collect();
    // Each VM has its own host key; the previous round's must not stand in the way.
    let _ = std::fs::remove_file(key.with_extension("known_hosts"));
    let started = Instant::now();
    let mut qemu = Command::new(&agent_argv[0])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu by hand");
    let deadline = started + BOOT;
    loop {
        if openssh(key, port, "true").is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the hand-started VM never answered SSH");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    let _ = qemu.kill();
    let _ = qemu.wait();
    took
}

/// Files for the hand-started VM, made the way the agent makes them (same seed, own key).
async fn hand_files(dir: &Path, public: &str, vars_template: &Path) {
    let base = ci_guest_image();
    let qemu_img = Path::new("qemu-img");
    disk::create_overlay(qemu_img, &base, &dir.join("disk.qcow2"), 2).await.unwrap();
    disk::copy_vars(vars_template, &dir.join("OVMF_VARS.fd")).unwrap();
    let content = qudata_agent::backend::qemu::seed::SeedContent {
        instance_id: "bench",
        hostname: "bench",
        management_public_key: public,
        mac: None,
    };
    qudata_agent::backend::qemu::seed::build_seed(&dir.join("seed.img"), &content).await.unwrap();
}

async fn overlay_on_20_gib_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base20.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("20G")
        .status()
        .unwrap();
    assert!(ok.success());
    let mut times = Vec::new();
    for i in 0..10 {
        let overlay = dir.path().join(format!("overlay{i}.qcow2"));
        let started = Instant::now();
        disk::create_overlay(Path::new("qemu-img"), &base, &overlay, 40).await.unwrap();
        times.push(started.elapsed());
    }
    println!(
        "overlay on a 20 GiB sparse base (qemu-img info + create): median {:?} over 10",
        median(times)
    );
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("vm benchmark: skipped (run it with `cargo bench --bench vm`)");
        return;
    }
    let rounds: usize =
        std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    overlay_on_20_gib_base().await;

    let dirs = Dirs::new();
    let mut agent = fresh_agent(&dirs);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "bench");
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();

    let (mut agent_times, mut hand_times) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (took, argv) = through_agent(&api, &dirs).await;
        agent_times.push(took);
        // The agent's paths: <data>/vms/<id>/… and <run>/vms/<id>/…, found from -pidfile.
        let pidfile = argv.iter().skip_while(|a| *a != "-pidfile").nth(1).unwrap().clone();
        let run_dir = Path::new(&pidfile).parent().unwrap().display().to_string();
        let id = Path::new(&run_dir).file_name().unwrap().to_string_lossy().into_owned();
        let vm_dir = dirs.data.join("vms").join(&id).display().to_string();
        // The management forward is the last hostfwd to guest port 22.
        let netdev = argv.iter().find(|a| a.starts_with("user,")).unwrap();
        let port: u16 = netdev
            .split(",hostfwd=tcp:127.0.0.1:")
            .filter_map(|f| f.strip_suffix("-:22"))
            .last()
            .unwrap()
            .parse()
            .unwrap();
        let hand = tempfile::tempdir().unwrap();
        hand_files(hand.path(), &public, &ovmf.vars_template).await;
        hand_times.push(by_hand(&argv, &vm_dir, &run_dir, hand.path(), &key, port));
        println!(
            "round {round}: agent {:.1} s, by hand {:.1} s",
            agent_times[round].as_secs_f64(),
            hand_times[round].as_secs_f64()
        );
    }
    let (a, h) = (median(agent_times), median(hand_times));
    println!(
        "create → running: agent median {:.1} s, same QEMU by hand until SSH login {:.1} s, ratio {:.3}",
        a.as_secs_f64(),
        h.as_secs_f64(),
        a.as_secs_f64() / h.as_secs_f64()
    );
}
