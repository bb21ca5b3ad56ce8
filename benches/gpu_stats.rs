//! GPU stats figures (issue "GPUs", item 8): a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench gpu_stats` measures:
//! - CPU time per stats sample of the NVML path: `GpuMetrics::current()` through nvml-wrapper
//!   and the fake `libnvidia-ml.so.1` (tests/support/fake_nvml; it reads its values file once
//!   per sample, which is counted), 1 and 8 GPUs;
//! - CPU time per sample of the guest path in the agent: parsing a sample's nvidia-smi lines,
//!   recording them, and reading the fresh values back (8 GPUs);
//! - the real agent (`run`, stats every 500 ms, mock control plane) with a CI-guest VM under
//!   TCG: its total CPU with the in-guest stream running, then with the guest's nvidia-smi
//!   removed (stream ended), same VM, each over `QUDATA_BENCH_SOAK_S` seconds (default 60).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use qudata_agent::gpu::{GpuMetrics, HostNvml};
use qudata_agent::guest::metrics::GuestGpuBoard;
use qudata_agent::guest::metrics::parse::parse_line;
use support::agent::{Agent, Api, Dirs, free_port};
use support::mock_cp::{Behaviour, MockCp, api_key, ok_stats};
use support::nvml::{FakeDriver, fake_library, h100};
use support::vm::{create_running, openssh, record, small_vm, vm_env, wait_status};

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the call only fills it.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU per call of `f`, over `n` calls.
fn per_call(n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f(); // warm-up
    }
    let start = thread_cpu();
    for _ in 0..n {
        f();
    }
    (thread_cpu() - start) / n
}

fn nvml_path(config: &std::path::Path) {
    for count in [1usize, 8] {
        FakeDriver {
            cuda: 12040,
            gpus: vec![h100(50, 60, 1000, Some(300_000)); count],
            ..Default::default()
        }
        .write(config);
        let nvml = Arc::new(HostNvml::new(fake_library()));
        nvml.reload();
        assert!(nvml.with(|_| ()).is_some(), "fake NVML loaded");
        let metrics =
            GpuMetrics::new(Some(nvml), GuestGpuBoard::default(), Duration::from_millis(500));
        assert_eq!(metrics.current().len(), count);
        let cpu = per_call(20_000, || {
            std::hint::black_box(metrics.current());
        });
        println!(
            "NVML path (fake libnvidia-ml), {count} GPU(s): {:.1} µs CPU per sample",
            cpu.as_secs_f64() * 1e6
        );
    }
}

fn guest_path() {
    let board = GuestGpuBoard::default();
    let metrics = GpuMetrics::new(None, board.clone(), Duration::from_millis(500));
    let lines: Vec<String> = (0..8)
        .map(|i| format!("{i}, NVIDIA H100 80GB HBM3, {}, 61, 40000, 81559, 612.53\n", 90 + i))
        .collect();
    let cpu = per_call(20_000, || {
        for line in &lines {
            board.record("bench", parse_line(line).unwrap().stats());
        }
        std::hint::black_box(metrics.current());
    });
    println!(
        "guest path in the agent (parse + record + read), 8 GPUs: {:.1} µs CPU per sample",
        cpu.as_secs_f64() * 1e6
    );
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The agent's CPU over `seconds`, and the `/stats` samples sent meanwhile.
async fn measure(cp: &MockCp, pid: u32, seconds: u64, what: &str) {
    let (t0, w0, s0) = (cpu_ticks(pid), Instant::now(), ok_stats(&cp.requests()).len());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let busy = (cpu_ticks(pid) - t0) as f64 / ticks_per_second();
    let wall = w0.elapsed().as_secs_f64();
    let reqs = cp.requests();
    let sent = ok_stats(&reqs)[s0..].to_vec();
    let with_gpus = sent.iter().filter(|s| s.body["gpus"].is_array()).count();
    println!(
        "agent, VM running, {what}: CPU {:.2}% of one core over {wall:.0} s ({busy:.2} s busy, {} samples, {with_gpus} with GPU values, {:.0} µs CPU per sample)",
        100.0 * busy / wall,
        sent.len(),
        busy * 1e6 / sent.len().max(1) as f64
    );
}

async fn agent_with_vm(seconds: u64) {
    let cp =
        MockCp::start(Behaviour { host_exists: true, without_frp: true, ..Default::default() });
    let dirs = Dirs::new();
    let mut env = cp.agent_env(&api_key(), 500);
    env.extend(vm_env());
    env.push(("QUDATA_DEBUG", "false".into()));
    env.push(("RUST_LOG", "info".into()));
    env.push(("QUDATA_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1".into()));
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    cp.until("registration", Duration::from_secs(60), |r| !ok_stats(r).is_empty()).await;
    let api = Api::new(&agent, Some(&cp.only_secret()));
    let id = create_running(&api, &small_vm()).await;
    tokio::time::sleep(Duration::from_secs(10)).await; // the guest settles after boot
    measure(&cp, agent.pid(), seconds, "in-guest GPU stream on").await;

    // Same VM without nvidia-smi: the stream ends (no GPU in the instance) and stays off.
    let key = dirs.data.join("keys/guest_ed25519");
    let port = record(&dirs, &id)["management_port"].as_u64().unwrap() as u16;
    openssh(&key, port, "rm /usr/bin/nvidia-smi; killall nvidia-smi").expect("remove nvidia-smi");
    tokio::time::sleep(Duration::from_secs(10)).await;
    measure(&cp, agent.pid(), seconds, "stream off").await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(120)).await;
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("gpu_stats benchmark: skipped (run it with `cargo bench --bench gpu_stats`)");
        return;
    }
    let seconds: u64 =
        std::env::var("QUDATA_BENCH_SOAK_S").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fake-nvml.conf");
    // SAFETY: set before any other thread exists (the runtime is built below); the fake
    // library reads it at nvmlInit and at every device count.
    unsafe { std::env::set_var("FAKE_NVML_CONFIG", &config) };
    nvml_path(&config);
    guest_path();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(agent_with_vm(seconds));
}
