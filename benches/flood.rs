//! The API under a flood of half-open connections (issue "hostile tenants", item 3): a
//! benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench flood` starts a local-mode agent, measures its RSS and the latency of
//! `GET /ping` (a new connection each, as frpc makes them), then holds 5,000 connections that
//! each sent half a request head and measures again while they are held, and once more while
//! the flood keeps opening new ones.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::agent::{Agent, Dirs, free_port};

const FLOOD: usize = 5000;
const PINGS: usize = 200;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
    line.split_whitespace().next().and_then(|v| v.parse().ok()).expect("a number")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn raise_nofile() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// p50 and p99 of `GET /ping`, a fresh connection each; failures counted.
async fn pings(agent: &Agent) -> (Duration, Duration, usize) {
    let url = agent.url("/ping");
    let mut times = Vec::new();
    let mut failed = 0;
    for _ in 0..PINGS {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let start = Instant::now();
        match client.get(&url).send().await {
            Ok(answer) if answer.status().is_success() => times.push(start.elapsed()),
            _ => failed += 1,
        }
    }
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (at(0.5), at(0.99), failed)
}

fn half_open(address: &str) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.write_all(b"GET /instances HTTP/1.1\r\nHost: x\r\n").ok()?;
    Some(stream)
}

fn report(what: &str, agent: &Agent, (p50, p99, failed): (Duration, Duration, usize)) {
    let pid = agent.pid();
    println!(
        "{what}: RSS {} KiB, {} descriptors; GET /ping p50 {:.2} ms, p99 {:.2} ms, {failed} of {PINGS} failed",
        rss_kib(pid),
        open_fds(pid),
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
    );
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("flood benchmark: skipped (run it with `cargo bench --bench flood`)");
        return;
    }
    raise_nofile();
    let dirs = Dirs::new();
    let quiet = [("QUDATA_DEBUG", "false".to_owned()), ("RUST_LOG", "warn".to_owned())];
    let mut agent = Agent::start(&dirs, &["run", "--local"], &quiet, free_port());
    agent.wait_ready().await;
    report("idle", &agent, pings(&agent).await);

    let address = format!("127.0.0.1:{}", agent.port);
    let target = address.clone();
    let held = tokio::task::spawn_blocking(move || {
        (0..FLOOD).filter_map(|_| half_open(&target)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    println!("{} half-open connections held", held.len());
    report("flood held", &agent, pings(&agent).await);

    // A flood that keeps coming: new half-open connections as fast as one thread opens them.
    let running = Arc::new(AtomicBool::new(true));
    let go = Arc::clone(&running);
    let flooder = std::thread::spawn(move || {
        let mut opened = Vec::new();
        while go.load(Ordering::Relaxed) {
            if let Some(s) = half_open(&address) {
                opened.push(s);
            }
            if opened.len() > FLOOD {
                opened.drain(..FLOOD / 2);
            }
        }
    });
    report("flood ongoing", &agent, pings(&agent).await);
    running.store(false, Ordering::Relaxed);
    flooder.join().unwrap();
    drop(held);
}
