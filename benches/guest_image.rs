//! Production guest image figures (issue "The guest a renter actually gets"): a benchmark, not
//! a test; it prints numbers.
//!
//! `cargo bench --bench guest_image` measures, in one run:
//! - `image-builder/build-guest.sh --no-nvidia`: cold (empty package cache, nothing built),
//!   cached (packages cached, image rebuilt) and up to date (a no-op); the image's size;
//! - through the agent under TCG: the seed's example request (`POST /instances`) → `running`,
//!   and → JupyterLab answering `/api/status` with its token through the published port;
//! - the same image booted by hand (`qemu-system-x86_64`, q35 + OVMF, the same size, a NoCloud
//!   seed, user networking): QEMU start → SSH login, and → a JupyterLab started over that SSH
//!   answering; the ratios.
//!
//! `QUDATA_BENCH_COLD=0` skips the cold build (it downloads every package again).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qudata_agent::backend::qemu::{disk, seed};
use serde_json::json;
use support::agent::{Agent, Api, Dirs, free_port, local_secret};
use support::vm::{BOOT, host_port, openssh, ssh_keygen, wait_gone, wait_status};

const TOKEN: &str = "bench-token-0123456789";

fn build(out: &Path, cache: &Path) -> Duration {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("image-builder/build-guest.sh");
    let started = Instant::now();
    let status = Command::new("bash")
        .arg(&script)
        .args(["--no-nvidia", "--out"])
        .arg(out)
        .env("QUDATA_IMAGE_CACHE", cache)
        .stdout(Stdio::null())
        .status()
        .expect("run the builder");
    assert!(status.success(), "the build failed");
    started.elapsed()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

async fn jupyter_answers(port: u16) -> bool {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let url = format!("http://127.0.0.1:{port}/api/status");
    let sent = client.get(url).header("Authorization", format!("token {TOKEN}")).send().await;
    sent.is_ok_and(|r| r.status().is_success())
}

async fn wait_jupyter(port: u16, since: Instant) -> Duration {
    while !jupyter_answers(port).await {
        assert!(since.elapsed() < BOOT * 2, "JupyterLab never answered");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    since.elapsed()
}

/// Through the agent: (create → running, create → Jupyter answering).
async fn through_agent(image: &Path) -> (Duration, Duration) {
    let dirs = Dirs::new();
    let env = [
        ("QUDATA_BASE_IMAGE", image.display().to_string()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
    ];
    let mut agent = Agent::start(&dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let body = json!({
        "image": "pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime",
        "ports": [
            {"container_port": 22, "remote_port": 10001, "proto": "tcp"},
            {"container_port": 8888, "remote_port": 20000, "proto": "http"}
        ],
        "env_variables": {"JUPYTER_TOKEN": TOKEN},
        "command": "jupyter lab --ip=0.0.0.0 --allow-root",
        "ssh_enabled": true, "cpus": 2, "memory": "2G", "storage_gb": 12
    });
    let started = Instant::now();
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_status(&api, "running", BOOT).await;
    let running = started.elapsed();
    let jupyter = wait_jupyter(host_port(&dirs, &id, 8888), started).await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
    (running, jupyter)
}

/// By hand: (QEMU start → SSH login, → a JupyterLab started over SSH answering).
async fn by_hand(image: &Path, key: &Path, public: &str) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let overlay = d.join("disk.qcow2");
    disk::create_overlay(Path::new("qemu-img"), image, &overlay, 12).await.unwrap();
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();
    let vars = d.join("OVMF_VARS.fd");
    disk::copy_vars(&ovmf.vars_template, &vars).unwrap();
    let seed_img = d.join("seed.img");
    let content = seed::SeedContent {
        instance_id: "by-hand",
        hostname: "by-hand",
        management_public_key: public,
        mac: None,
    };
    seed::build_seed(&seed_img, &content).await.unwrap();
    let (ssh, web) = (free_port(), free_port());
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={}", ovmf.code.display()))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("if=virtio,format=qcow2,file={}", overlay.display()))
        .arg("-drive")
        .arg(format!("if=virtio,format=raw,readonly=on,file={}", seed_img.display()))
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{ssh}-:22,hostfwd=tcp:127.0.0.1:{web}-:8888"
        ))
        .args(["-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci"])
        .arg("-serial")
        .arg(format!("file:{}", d.join("serial.log").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu by hand");
    let _ = std::fs::remove_file(key.with_extension("known_hosts"));
    while openssh(key, ssh, "true").is_err() {
        assert!(started.elapsed() < BOOT, "the hand-started VM never answered SSH");
        std::thread::sleep(Duration::from_millis(250));
    }
    let login = started.elapsed();
    // As a person would on a systemd guest: a transient unit, so the SSH session returns at
    // once (a backgrounded `setsid nohup` kept OpenSSH's session open here).
    let start_jupyter = format!(
        "systemd-run --unit=jupyter --setenv=JUPYTER_TOKEN={TOKEN} --working-directory=/root \
         jupyter lab --ip=0.0.0.0 --port=8888 --no-browser --allow-root"
    );
    openssh(key, ssh, &start_jupyter).expect("start jupyter by hand");
    let jupyter = wait_jupyter(web, started).await;
    let _ = qemu.kill();
    let _ = qemu.wait();
    (login, jupyter)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("guest_image benchmark: skipped (run it with `cargo bench --bench guest_image`)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let image: PathBuf = work.path().join("guest.qcow2");
    if std::env::var("QUDATA_BENCH_COLD").as_deref() != Ok("0") {
        let cold_cache = work.path().join("cache");
        let cold = build(&image, &cold_cache);
        println!("build, cold (empty package cache): {:.0} s", cold.as_secs_f64());
        std::fs::remove_file(&image).unwrap();
        let cached = build(&image, &cold_cache);
        println!("build, packages cached: {:.0} s", cached.as_secs_f64());
    }
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("image-builder/.cache");
    let _ = std::fs::remove_file(&image); // the cache dir is not an input: rebuild, not a no-op
    let first = build(&image, &cache);
    let again = build(&image, &cache);
    println!(
        "build with the shared cache: {:.0} s; up to date: {:.1} s",
        first.as_secs_f64(),
        again.as_secs_f64()
    );
    let size = std::fs::metadata(&image).unwrap().len();
    println!("image: {:.0} MiB qcow2 (compressed)", mib(size));

    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "bench");
    let (agent_running, agent_jupyter) = through_agent(&image).await;
    println!(
        "through the agent: create → running {:.0} s, → JupyterLab answering {:.0} s",
        agent_running.as_secs_f64(),
        agent_jupyter.as_secs_f64()
    );
    let (hand_login, hand_jupyter) = by_hand(&image, &key, &public).await;
    println!(
        "create → running: agent {:.0} s; QEMU by hand → SSH login {:.0} s; ratio {:.2}",
        agent_running.as_secs_f64(),
        hand_login.as_secs_f64(),
        agent_running.as_secs_f64() / hand_login.as_secs_f64()
    );
    println!(
        "create → JupyterLab answering: agent {:.0} s; by hand (boot, SSH, start it) {:.0} s; \
         ratio {:.2}",
        agent_jupyter.as_secs_f64(),
        hand_jupyter.as_secs_f64(),
        agent_jupyter.as_secs_f64() / hand_jupyter.as_secs_f64()
    );
}
