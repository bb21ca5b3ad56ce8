//! Docker figures (issue 7, item 7): a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench docker` measures, on a private test engine with the busybox image:
//! `POST /instances` → `running` through the agent, against `docker run -d` of the same
//! container by hand (same image, command, init, restart policy, published port), alternating,
//! as a ratio; and for both, the time until the published port serves the page.
//!
//! `QUDATA_BENCH_ROUNDS` sets the number of alternating rounds (default 5).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::agent::{Api, Dirs};
use support::docker::Engine;
use support::docker_agent::{START, started, wait_container_gone};
use support::docker_images::busybox;
use support::vm::{host_port, http_get};

const COMMAND: &str = "mkdir -p /srv && echo up > /srv/index.html && exec httpd -f -p 8080 -h /srv";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Polls until the page answers; the time since `from`.
async fn until_served(port: u16, from: Instant) -> Duration {
    let deadline = from + START;
    while http_get(port).await.is_none() {
        assert!(Instant::now() < deadline, "127.0.0.1:{port} never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    from.elapsed()
}

/// One create through the agent: (to `running`, to the page served).
async fn through_agent(
    api: &Api,
    dirs: &Dirs,
    engine: &Engine,
    image: &str,
) -> (Duration, Duration) {
    let body = json!({
        "image": image, "cpus": 1, "memory": "256M", "command": COMMAND,
        "ports": [{"container_port": 8080, "remote_port": 20000, "proto": "http"}],
    });
    let started = Instant::now();
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    loop {
        let status = api.get("/instances").await.body["data"]["status"].clone();
        if status == "running" {
            break;
        }
        assert!(status == "pending" && started.elapsed() < START, "status {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let running = started.elapsed();
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    let served = until_served(host_port(dirs, &id, 8080), started).await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_container_gone(engine, &id, Duration::from_secs(60));
    (running, served)
}

/// The same container with `docker run -d`: (until it returns, to the page served).
async fn by_hand(engine: &Engine, image: &str, round: usize) -> (Duration, Duration) {
    let port = support::agent::free_port();
    let name = format!("bench-by-hand-{round}");
    let publish = format!("127.0.0.1:{port}:8080");
    let started = Instant::now();
    engine.must(&[
        "run",
        "-d",
        "--init",
        "--restart",
        "unless-stopped",
        "--cpus",
        "1",
        "--memory",
        "256m",
        "--name",
        &name,
        "-p",
        &publish,
        image,
        "/bin/sh",
        "-c",
        COMMAND,
    ]);
    let running = started.elapsed();
    let served = until_served(port, started).await;
    engine.must(&["rm", "-f", "-v", &name]);
    (running, served)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("docker benchmark: skipped (run it with `cargo bench --bench docker`)");
        return;
    }
    let rounds: usize =
        std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let engine = Engine::start_new();
    let image = busybox(&engine);
    let (dirs, _agent, api) = started(&engine).await;
    let (mut agent, mut hand) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let a = through_agent(&api, &dirs, &engine, image).await;
        let h = by_hand(&engine, image, round).await;
        println!(
            "round {round}: agent running {:.3} s (served {:.3} s), docker run {:.3} s (served {:.3} s)",
            a.0.as_secs_f64(),
            a.1.as_secs_f64(),
            h.0.as_secs_f64(),
            h.1.as_secs_f64()
        );
        agent.push(a);
        hand.push(h);
    }
    let ratio = |a: Duration, h: Duration| a.as_secs_f64() / h.as_secs_f64();
    let (ar, hr) =
        (median(agent.iter().map(|x| x.0).collect()), median(hand.iter().map(|x| x.0).collect()));
    let (asv, hsv) =
        (median(agent.iter().map(|x| x.1).collect()), median(hand.iter().map(|x| x.1).collect()));
    println!(
        "create → running: agent median {:.3} s, docker run {:.3} s, ratio {:.2}",
        ar.as_secs_f64(),
        hr.as_secs_f64(),
        ratio(ar, hr)
    );
    println!(
        "create → page served: agent median {:.3} s, docker run {:.3} s, ratio {:.2}",
        asv.as_secs_f64(),
        hsv.as_secs_f64(),
        ratio(asv, hsv)
    );
}
