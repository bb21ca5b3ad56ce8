//! Start-up and provisioning figures: a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench startup` measures:
//! - agent start → `READY=1` on `$NOTIFY_SOCKET` (what systemd waits for), in local mode and
//!   in production mode with the control plane down, no instances;
//! - `install.sh --root DIR` in production mode: a first run (file:// downloads, checksums)
//!   and an idempotent second run, with a base image of `QUDATA_BENCH_IMAGE_MIB` (default 256);
//! - the one-line install (`bash -s -- ak-…` from a pipe, no checkout) from a release artefact
//!   made by `scripts/dist.sh` (file:// URL), first and second run, and the artefact's size.
//!
//! `QUDATA_BENCH_ROUNDS` sets the rounds of each (default 10 for start-up, a third of it, at
//! least 2, for the installer).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use support::agent::{Agent, Dirs, free_port};
use support::install::Fixture;
use tokio::net::UnixDatagram;

fn rounds() -> usize {
    std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10).max(1)
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.0} ms, min {:.0} ms, max {:.0} ms",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

/// One start: the time from spawning the agent to its READY=1.
async fn start_to_ready(args: &[&str], env: &[(&str, String)]) -> Duration {
    let dirs = Dirs::new();
    let socket = dirs.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).unwrap();
    let mut env = env.to_vec();
    env.push(("NOTIFY_SOCKET", socket.to_string_lossy().into_owned()));
    // Quiet logs: the figure is the agent's start, not its debug output.
    env.push(("RUST_LOG", "warn".into()));
    env.push(("QUDATA_DEBUG", "false".into()));
    let started = Instant::now();
    let mut agent = Agent::start(&dirs, args, &env, free_port());
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(90), sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no READY=1 within 90 s:\n{}", agent.output()))
            .unwrap();
        if buf[..n].starts_with(b"READY=1") {
            break;
        }
    }
    let took = started.elapsed();
    agent.terminate();
    took
}

async fn startup(rounds: usize) {
    let local: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..rounds {
            v.push(start_to_ready(&["run", "--local"], &[]).await);
        }
        v
    };
    println!("start → READY=1, local mode ({rounds} runs): {}", summary(local));
    let service = format!("http://127.0.0.1:{}/v0", free_port());
    let env = [("QUDATA_API_KEY", "ak-bench".to_owned()), ("QUDATA_SERVICE_URL", service)];
    let mut production = Vec::new();
    for _ in 0..rounds {
        production.push(start_to_ready(&["run"], &env).await);
    }
    println!(
        "start → READY=1, production mode, control plane down ({rounds} runs): {}",
        summary(production)
    );
}

fn installer(rounds: usize) {
    let mib: u32 =
        std::env::var("QUDATA_BENCH_IMAGE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let fx = Fixture::with_image(true, mib << 20);
        let started = Instant::now();
        let run = fx.install(&[], &[]);
        first.push(started.elapsed());
        assert!(run.ok, "{}", run.text);
        let started = Instant::now();
        let run = fx.install(&[], &[]);
        second.push(started.elapsed());
        assert!(run.ok && !run.text.contains("installed"), "{}", run.text);
    }
    println!("install.sh --root, first run, {mib} MiB image ({rounds} runs): {}", summary(first));
    println!("install.sh --root, second run (all up to date) ({rounds} runs): {}", summary(second));

    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut size = 0;
    for _ in 0..rounds {
        let fx = Fixture::with_image(true, mib << 20);
        let tarball = support::install::make_release(&fx.src.join("release"));
        size = std::fs::metadata(&tarball).unwrap().len();
        let url = format!("file://{}", fx.src.join("release").display());
        let env = [("INSTALL_RELEASE_URL", url)];
        let started = Instant::now();
        let run = fx.install_piped(&[support::install::KEY], &env);
        first.push(started.elapsed());
        assert!(run.ok, "{}", run.text);
        let started = Instant::now();
        let run = fx.install_piped(&[support::install::KEY], &env);
        second.push(started.elapsed());
        assert!(run.ok && !run.text.contains("installed /"), "{}", run.text);
    }
    println!("release artefact (scripts/dist.sh, this build): {:.1} MiB", size as f64 / 1048576.0);
    println!("one-line install from the artefact, first run ({rounds} runs): {}", summary(first));
    println!("one-line install, second run (all up to date) ({rounds} runs): {}", summary(second));
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // and a test run must not spend minutes measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("startup benchmark: skipped (run it with `cargo bench --bench startup`)");
        return;
    }
    let rounds = rounds();
    startup(rounds).await;
    tokio::task::spawn_blocking(move || installer((rounds / 3).max(2))).await.unwrap();
}
