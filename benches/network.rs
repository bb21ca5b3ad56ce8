//! The guests' network against QEMU's user-mode network (issue "The VM's network"): a
//! benchmark, not a test; it prints numbers.
//!
//! `QUDATA_BENCH_AGENT=<an agent built before the change> cargo bench --bench network` runs the
//! same VM (CI guest, TCG) through each agent in local mode and measures, host → guest:
//! - create → `running`;
//! - one TCP stream of 256 MiB, and four at once of 64 MiB each (the guest's busybox `nc`
//!   drains them to /dev/null);
//! - a small HTTP request (a new connection each, busybox httpd in the guest): p50 and p99.
//!
//! The new agent is measured on both of its paths: the guest's own address (what frpc uses) and
//! its relay on 127.0.0.1 (local mode). The old one has only slirp's forward on 127.0.0.1.
//! Without `QUDATA_BENCH_AGENT` only the new agent is measured; `QUDATA_BENCH_AGENT_AFTER`
//! names the new agent's binary (a build of the same profile as the old one), else this
//! build's.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use support::agent::{Agent, Api, Dirs, free_port, local_secret};
use support::vm::{BOOT, host_port, openssh, record, ssh_keygen, vm_env, wait_status};

const STREAM: usize = 256 << 20;
const PARALLEL: usize = 4;
const REQUESTS: usize = 100;
const SINKS: [u16; 5] = [5001, 5002, 5003, 5004, 5005];

/// vCPUs of the VM (`QUDATA_BENCH_CPUS`, default 1): on the bridge, one queue each.
fn cpus() -> u32 {
    std::env::var("QUDATA_BENCH_CPUS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn body() -> serde_json::Value {
    let mut ports: Vec<serde_json::Value> = SINKS
        .iter()
        .map(|p| json!({"container_port": p, "remote_port": 20000 + p, "proto": "tcp"}))
        .collect();
    ports.push(json!({"container_port": 8080, "remote_port": 28080, "proto": "http"}));
    json!({
        "ssh_enabled": true, "cpus": cpus(), "memory": "512M", "storage_gb": 2, "ports": ports,
        "command": "mkdir -p /srv && echo ok > /srv/index.html && exec httpd -f -p 8080 -h /srv"
    })
}

/// Starts `nc -l` sinks in the guest for `ports`.
fn sinks(key: &std::path::Path, ssh: u16, ports: &[u16]) {
    let line: Vec<String> =
        ports.iter().map(|p| format!("(nc -l -p {p} >/dev/null </dev/null 2>&1 &)")).collect();
    openssh(key, ssh, &format!("{}; sleep 1", line.join("; "))).expect("sinks");
}

/// Writes `bytes` to `to` and waits for the guest to close: MB/s.
fn push(to: SocketAddr, bytes: usize) -> f64 {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect");
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).expect("write");
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = s.read(&mut [0u8; 16]);
    bytes as f64 / 1e6 / started.elapsed().as_secs_f64()
}

fn get_ms(to: SocketAddr) -> f64 {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(String::from_utf8_lossy(&out).contains("ok"));
    started.elapsed().as_secs_f64() * 1000.0
}

/// Single-stream and parallel throughput, and request latency, to the guest at `at(port)`.
fn measure(label: &str, key: &std::path::Path, ssh: u16, at: &dyn Fn(u16) -> SocketAddr) {
    sinks(key, ssh, &SINKS[..1]);
    let single = push(at(SINKS[0]), STREAM);
    sinks(key, ssh, &SINKS[1..=PARALLEL]);
    let started = Instant::now();
    let threads: Vec<_> = SINKS[1..=PARALLEL]
        .iter()
        .map(|p| {
            let to = at(*p);
            std::thread::spawn(move || push(to, STREAM / PARALLEL))
        })
        .collect();
    threads.into_iter().for_each(|t| drop(t.join()));
    let parallel = STREAM as f64 / 1e6 / started.elapsed().as_secs_f64();
    let mut ms: Vec<f64> = (0..REQUESTS).map(|_| get_ms(at(8080))).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: usize| ms[(ms.len() * p / 100).min(ms.len() - 1)];
    println!(
        "{label:<34} 1 stream {single:>7.1} MB/s   {PARALLEL} streams {parallel:>7.1} MB/s   \
         GET p50 {:>6.2} ms  p99 {:>6.2} ms",
        pct(50),
        pct(99)
    );
}

async fn run(name: &str, binary: Option<String>) {
    match &binary {
        // SAFETY: set before the agent starts, read by the test support when it spawns it;
        // this benchmark runs its cases one after another on one thread.
        Some(path) => unsafe { std::env::set_var("QUDATA_BENCH_AGENT", path) },
        None => unsafe { std::env::remove_var("QUDATA_BENCH_AGENT") },
    }
    let dirs = Dirs::new();
    let mut agent = Agent::start(&dirs, &["run", "--local"], &vm_env(), free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let started = Instant::now();
    let created = api.json("POST", "/instances", &body()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_status(&api, "running", BOOT).await;
    println!("{name:<34} create → running {:>6.1} s", started.elapsed().as_secs_f64());
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "bench");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    let ssh = host_port(&dirs, &id, 22);
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], host_port(&dirs, &id, port)));
    measure(&format!("{name}, 127.0.0.1 forward"), &key, ssh, &local);
    if let Some(address) = record(&dirs, &id)["network"]["address"].as_str() {
        let address: std::net::Ipv4Addr = address.parse().unwrap();
        let direct = move |port: u16| SocketAddr::from((address, port));
        measure(&format!("{name}, guest address (frpc)"), &key, ssh, &direct);
    }
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    support::vm::wait_gone(&dirs, &id, Duration::from_secs(120)).await;
    agent.kill9();
}

#[tokio::main]
async fn main() {
    println!("guest network, CI guest under TCG, {} vCPU(s); host → guest", cpus());
    if let Ok(old) = std::env::var("QUDATA_BENCH_AGENT") {
        run("before: slirp", Some(old)).await;
    }
    run("after: tap + bridge", std::env::var("QUDATA_BENCH_AGENT_AFTER").ok()).await;
}
