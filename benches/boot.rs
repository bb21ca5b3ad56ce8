//! Boot-truth figures (issue "make the accelerator choice and every boot failure tell the
//! truth within seconds"): a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench boot` measures, on this host:
//! - the accelerator probe guest under KVM (its answer, and how long the answer took), and the
//!   decision read from the per-boot cache;
//! - the time from `POST /instances` to `error` for each failure class: a disk of zeros, a GPT
//!   disk without an EFI partition, a guest kernel panic, QEMU killed while the guest boots, a
//!   guest that never answers SSH (boot deadline set to 30 s);
//! - with a passing probe recorded for this boot where KVM then fails the VM: the time to
//!   `running` through the TCG fallback, against a plain TCG create.
//!
//! `QUDATA_BENCH_ROUNDS` sets the rounds per figure (default 3).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use qudata_agent::backend::qemu::accel::{self, Accel, ProbeOutcome};
use qudata_agent::config::AccelChoice;
use serde_json::{Value, json};
use support::agent::{Agent, Api, Dirs, free_port, local_secret};
use support::guests::{host_ovmf, install_test_guest, install_zeros, qemu};
use support::vm::{
    BOOT, ci_guest_image, qemu_pids, small_vm, wait_for_qemu, wait_gone, wait_status,
};
use support::wait::wait_until;

fn rounds() -> usize {
    std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn show(what: &str, v: Vec<Duration>) {
    let all: Vec<String> = v.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect();
    println!("{what:<48} median {:>6.2} s   ({} s)", median(v).as_secs_f64(), all.join(", "));
}

async fn agent(dirs: &Dirs, accel: Option<&str>, boot_timeout: Option<&str>) -> (Agent, Api) {
    let mut env = vec![("QUDATA_BASE_IMAGE", ci_guest_image().display().to_string())];
    env.extend(accel.map(|a| ("QUDATA_QEMU_ACCEL", a.to_owned())));
    env.extend(boot_timeout.map(|t| ("QUDATA_VM_BOOT_TIMEOUT", t.to_owned())));
    let mut agent = Agent::start(dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(dirs)));
    (agent, api)
}

async fn create(api: &Api, image: Option<&str>) -> String {
    let mut body = small_vm();
    if let Some(image) = image {
        body["image"] = json!(image);
    }
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    created.body["data"]["id"].as_str().unwrap().to_owned()
}

async fn delete(dirs: &Dirs, api: &Api, id: &str) {
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(dirs, id, Duration::from_secs(60)).await;
    wait_status(api, "destroyed", Duration::from_secs(30)).await;
    // The record goes last: the next create is refused until it has.
    let what = format!("the record of {id} removed");
    let every = Duration::from_millis(100);
    wait_until(what, Duration::from_secs(30), every, async || dirs.records().is_empty()).await;
}

/// Create → `error` for `image`; prints the first reason seen.
async fn to_error(dirs: &Dirs, api: &Api, image: &str, label: &str) {
    let mut times = Vec::new();
    let mut reason = Value::Null;
    for _ in 0..rounds() {
        let started = Instant::now();
        let id = create(api, Some(image)).await;
        let failed = wait_status(api, "error", BOOT).await;
        times.push(started.elapsed());
        reason = failed["error"].clone();
        delete(dirs, api, &id).await;
    }
    show(label, times);
    println!("    {}", reason.as_str().unwrap_or_default());
}

async fn probe_figures() {
    let dir = tempfile::tempdir().unwrap();
    let mut times = Vec::new();
    let mut answer = None;
    for _ in 0..rounds() {
        let started = Instant::now();
        let out =
            accel::run_probe(&qemu(), &host_ovmf(), Accel::Kvm, dir.path(), accel::PROBE_DEADLINE)
                .await
                .unwrap();
        times.push(started.elapsed());
        answer = Some(out);
    }
    show("probe guest under KVM (no cache)", times);
    println!("    answer: {answer:?}");
    let started = Instant::now();
    let decision =
        accel::decide(AccelChoice::Auto, &qemu(), &host_ovmf(), dir.path()).await.unwrap();
    let first = started.elapsed();
    let started = Instant::now();
    accel::decide(AccelChoice::Auto, &qemu(), &host_ovmf(), dir.path()).await.unwrap();
    println!(
        "decision: {} ({}); first {:.1} ms, cached {:.2} ms",
        decision.accel.as_str(),
        decision.reason,
        first.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs benches too: only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("boot benchmark: skipped (run it with `cargo bench --bench boot`)");
        return;
    }
    probe_figures().await;

    let dirs = Dirs::new();
    let zeros = install_zeros(&dirs);
    let no_esp = install_test_guest(&dirs, "no-esp");
    let panics = install_test_guest(&dirs, "panic");
    let silent = install_test_guest(&dirs, "silent");
    let (_agent, api) = agent(&dirs, Some("tcg"), Some("30")).await;
    to_error(&dirs, &api, &zeros, "create → error: disk of zeros").await;
    to_error(&dirs, &api, &no_esp, "create → error: GPT disk without an ESP").await;
    to_error(&dirs, &api, &panics, "create → error: guest kernel panic").await;
    to_error(&dirs, &api, &silent, "create → error: never answers SSH (30 s deadline)").await;

    let mut killed = Vec::new();
    for _ in 0..rounds() {
        let id = create(&api, Some(&silent)).await;
        let pid = wait_for_qemu(&id, Duration::from_secs(60)).await;
        let serial = dirs.data.join("vms").join(&id).join("serial.log");
        while std::fs::metadata(&serial).map_or(0, |m| m.len()) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        // SAFETY: kill(2) on the bench's own VM process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_status(&api, "error", BOOT).await;
        killed.push(started.elapsed());
        assert!(qemu_pids(&id).is_empty());
        delete(&dirs, &api, &id).await;
    }
    show("QEMU killed while booting → error", killed);

    // A fresh agent without the short deadline for the creates that must reach `running`.
    let dirs = Dirs::new();
    let (_agent, api) = agent(&dirs, Some("tcg"), None).await;
    let mut plain = Vec::new();
    for _ in 0..rounds() {
        let started = Instant::now();
        let id = create(&api, None).await;
        wait_status(&api, "running", BOOT).await;
        plain.push(started.elapsed());
        delete(&dirs, &api, &id).await;
    }
    show("create → running under TCG", plain);

    let mut fallback = Vec::new();
    for _ in 0..rounds() {
        // Each round: a host where the probe passed, then KVM fails the VM.
        let dirs = Dirs::new();
        accel::cache_answer(&dirs.run, &qemu(), &host_ovmf(), &ProbeOutcome::Works);
        let (agent, api) = agent(&dirs, None, None).await;
        let started = Instant::now();
        let id = create(&api, None).await;
        wait_status(&api, "running", BOOT).await;
        fallback.push(started.elapsed());
        let fell_back = agent.output().contains("booting the VM again under TCG");
        println!("    round: fell back to TCG: {fell_back}");
        delete(&dirs, &api, &id).await;
    }
    show("create → running, KVM failing then TCG", fallback);
}
