//! Recovery figures (issue 6, item 6): a benchmark, not a test; it prints numbers.
//!
//! `cargo bench --bench recover` measures:
//! - a restarted agent (`kill -9`, then `run --local` again) until it serves with one VM (the CI
//!   guest under TCG) adopted: start-up recovery runs before the API serves, so the first
//!   answered `GET /ping` means the VM is adopted;
//! - `qudata-agent recover` stopping 10 orphan QEMUs (`-S`, no disk, pidfile and monitor in the
//!   layout) and removing their files, wall time of the whole command.
//!
//! `QUDATA_BENCH_ROUNDS` sets the number of rounds of each (default 5).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use support::agent::{Api, Dirs, free_port, local_secret};
use support::orphans::orphan;
use support::vm::{BOOT, create_running, qemu_pids, small_vm, start_agent, wait_status};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

async fn restart_with_one_vm(rounds: usize) {
    let dirs = Dirs::new();
    let port = free_port();
    let mut agent = start_agent(&dirs, port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let id = create_running(&api, &small_vm()).await;
    let pids = qemu_pids(&id);

    let mut serving = Vec::new();
    for round in 0..rounds {
        agent.kill9();
        let started = Instant::now();
        agent = start_agent(&dirs, port);
        agent.wait_ready().await; // start-up reconciliation happens before the API serves
        serving.push(started.elapsed());
        assert!(agent.output().contains("instance adopted"), "{}", agent.output());
        assert_eq!(qemu_pids(&id), pids, "the same VM, adopted");
        println!("round {round}: serving with the VM adopted after {}", secs(serving[round]));
        // The next kill waits until the adoption's re-configuration over SSH is done.
        wait_status(&api, "running", BOOT).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "restart with one VM adopted: serving again after median {} ({rounds} rounds)",
        secs(median(serving))
    );
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    support::vm::wait_gone(&dirs, &id, Duration::from_secs(120)).await;
}

fn recover_ten_orphans(rounds: usize) {
    let mut times = Vec::new();
    for round in 0..rounds {
        let dirs = Dirs::new();
        let mut orphans: Vec<_> =
            (0..10).map(|i| orphan(&dirs.data, &dirs.run, &format!("orphan-{i}"))).collect();
        let started = Instant::now();
        let out = support::agent::recover_command(&dirs).output().unwrap();
        let took = started.elapsed();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(orphans.iter_mut().all(|o| !o.alive()), "every orphan stopped");
        println!("round {round}: recover reaped 10 orphans in {}", secs(took));
        times.push(took);
    }
    println!("recover, 10 orphan QEMUs: median {} ({rounds} rounds)", secs(median(times)));
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("recover benchmark: skipped (run it with `cargo bench --bench recover`)");
        return;
    }
    let rounds: usize =
        std::env::var("QUDATA_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    recover_ten_orphans(rounds);
    restart_with_one_vm(rounds).await;
}
