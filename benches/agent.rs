//! Agent figures (issue "foundation", item 9): a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench agent` measures, on loopback:
//! - requests per second and p50/p99 latency of `GET /instances` with 32 keep-alive connections;
//! - CPU use of `run` over 60 s and its resident memory after a soak (default 300 s) with the
//!   stats loop at 500 ms against the mock control plane.
//!
//! `QUDATA_BENCH_SOAK_S` shortens the soak; `QUDATA_BENCH_LOAD_S` the load phase (default 10).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use support::agent::{Agent, Dirs, free_port, local_secret};

const CONNECTIONS: usize = 32;

fn secs_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Quiet logging: the figures are about the agent, not its debug output.
fn quiet() -> Vec<(&'static str, String)> {
    vec![("QUDATA_DEBUG", "false".into()), ("RUST_LOG", "info".into())]
}

/// CPU time (user + system) of a process, in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

async fn load(agent: &Agent, secret: &str, seconds: u64) {
    let url = agent.url("/instances");
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        // One client per worker: one keep-alive connection each.
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
        let (url, secret) = (url.clone(), secret.to_owned());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let resp = client.get(&url).header("X-Agent-Secret", &secret).send().await;
                let ok = matches!(&resp, Ok(r) if r.status() == 200);
                if let Ok(r) = resp {
                    let _ = r.bytes().await;
                }
                assert!(ok, "GET /instances failed during the load");
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "GET /instances, {CONNECTIONS} connections, {seconds} s: {:.0} req/s, p50 {:?}, p99 {:?} ({} requests)",
        all.len() as f64 / seconds as f64,
        pct(0.50),
        pct(0.99),
        all.len()
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // and a test run must not spend minutes measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("agent benchmark: skipped (run it with `cargo bench --bench agent`)");
        return;
    }
    let load_s = secs_from_env("QUDATA_BENCH_LOAD_S", 10);
    let soak_s = secs_from_env("QUDATA_BENCH_SOAK_S", 300).max(60);

    let dirs = Dirs::new();
    let mut agent = Agent::start(&dirs, &["run", "--local"], &quiet(), free_port());
    agent.wait_ready().await;
    load(&agent, &local_secret(&dirs), load_s).await;
    drop(agent);

    soak(soak_s).await;
}

/// `run` against the mock control plane, stats every 500 ms: CPU over 60 s, then RSS at the
/// end of the soak.
async fn soak(seconds: u64) {
    use support::mock_cp::{Behaviour, MockCp, api_key, count};

    let cp = MockCp::start(Behaviour::default());
    let dirs = Dirs::new();
    let mut env = cp.agent_env(&api_key(), 500);
    env.extend(quiet());
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    let pid = agent.pid();
    // Let registration and the first samples settle before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_start = rss_kib(pid);

    let (t0, w0) = (cpu_ticks(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(60)).await;
    let busy = (cpu_ticks(pid) - t0) as f64 / ticks_per_second();
    let wall = w0.elapsed().as_secs_f64();
    println!(
        "run, stats every 500 ms: CPU {:.2}% of one core over {wall:.0} s ({busy:.2} s busy)",
        100.0 * busy / wall
    );

    tokio::time::sleep(Duration::from_secs(seconds.saturating_sub(65))).await;
    let stats = count(&cp.requests(), "/stats");
    println!(
        "run, stats every 500 ms: RSS {} KiB after {seconds} s (was {rss_start} KiB after 5 s); {stats} samples sent",
        rss_kib(pid)
    );
}
