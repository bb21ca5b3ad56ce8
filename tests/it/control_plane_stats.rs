//! The stats loop of the real binary against the mock control plane: cadence, samples kept
//! across an outage and sent in order, one request in flight at most.

use std::time::Duration;

use crate::support::agent::{Agent, Api, Dirs, free_port};
use crate::support::mock_cp::{Behaviour, MockCp, Recorded, api_key, count, ok_stats};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn stats_come_at_the_configured_cadence() {
    let cp = MockCp::start(Behaviour { host_exists: true, ..Default::default() });
    let dirs = Dirs::new();
    let mut agent = Agent::start(&dirs, &["run"], &cp.agent_env(&api_key(), 200), free_port());
    agent.wait_ready().await;
    let start = cp.until("a first sample", WAIT, |r| !ok_stats(r).is_empty()).await;
    // A measuring window (samples counted over 3 s), not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = ok_stats(&cp.requests()).len() - ok_stats(&start).len();
    // 3 s at 200 ms is 15 samples; the range only catches a stalled or runaway loop.
    assert!((5..=30).contains(&sent), "{sent} samples in 3 s");
    assert_eq!(count(&cp.requests(), "/init/host"), 0, "host_exists: true");
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_made_during_an_outage_all_arrive_in_order() {
    let interval_ms = 200;
    let cp = MockCp::start(Behaviour::default());
    let dirs = Dirs::new();
    let mut agent =
        Agent::start(&dirs, &["run"], &cp.agent_env(&api_key(), interval_ms), free_port());
    agent.wait_ready().await;
    cp.until("three samples", WAIT, |r| ok_stats(r).len() >= 3).await;
    cp.set_down(true);
    // The outage lasts 4 s on purpose: samples pile up meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let at_recovery = cp.requests().len();
    cp.set_down(false);
    let reqs = cp
        .until("the backlog flushed", WAIT, |r| {
            let failed = r.iter().filter(|r| r.path == "/stats" && r.answered == 503).count();
            ok_stats(&r[at_recovery.min(r.len())..]).len() > failed
        })
        .await;

    let failed: Vec<&Recorded> =
        reqs.iter().filter(|r| r.path == "/stats" && r.answered == 503).collect();
    assert!(failed.len() >= 5, "the loop kept trying at its cadence: {}", failed.len());
    // The oldest kept sample is retried, never skipped, and is the first to arrive after.
    assert!(failed.iter().all(|r| r.body == failed[0].body), "the head of the backlog is retried");
    let after: Vec<&Recorded> = ok_stats(&reqs[at_recovery..]);
    assert_eq!(after[0].body, failed[0].body, "sent in order");

    // No sample was lost: one per interval over the whole run.
    let ok = ok_stats(&reqs);
    let span = ok.last().unwrap().at - ok.first().unwrap().at;
    let expected = span.as_millis() as f64 / interval_ms as f64;
    assert!(ok.len() as f64 >= 0.7 * expected, "{} samples over {span:?}", ok.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_control_plane_never_has_two_stats_in_flight() {
    let cp = MockCp::start(Behaviour {
        host_exists: true,
        stats_latency: Duration::from_millis(700),
        ..Default::default()
    });
    let dirs = Dirs::new();
    let mut agent = Agent::start(&dirs, &["run"], &cp.agent_env(&api_key(), 100), free_port());
    agent.wait_ready().await;
    cp.until("four slow samples", WAIT, |r| ok_stats(r).len() >= 4).await;
    assert_eq!(cp.max_stats_in_flight(), 1);
    // The API answers while the reporter waits on the network.
    let secret = cp.only_secret();
    assert_eq!(Api::new(&agent, Some(&secret)).get("/instances").await.status, 200);
}
