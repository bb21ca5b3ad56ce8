//! The in-guest GPU metrics stream against a real OpenSSH server whose host has no
//! `nvidia-smi` (as a guest without the NVIDIA driver): it ends quietly for an instance
//! without GPUs and keeps retrying for one with GPUs, until stopped, each try a channel on the
//! guest's one session. The data path (lines into `/stats`) runs against the real VM in
//! tests/it/gpu_guest.rs.

use std::sync::Arc;
use std::time::Duration;

use qudata_agent::guest::metrics::{GpuStreams, GuestGpuBoard, StreamSpec};
use qudata_agent::guest::{GuestSession, GuestTarget, ManagementKey};

use crate::support::sshd::Sshd;
use crate::support::wait::wait_until;

const WAIT: Duration = Duration::from_secs(60);

fn spec(session: &Arc<GuestSession>, has_gpus: bool) -> StreamSpec {
    StreamSpec { session: session.clone(), has_gpus, interval: Duration::from_millis(200) }
}

fn logins(sshd: &Sshd) -> usize {
    sshd.log().matches("Accepted publickey").count()
}

/// Commands sshd started (one per channel the stream opened).
fn commands(sshd: &Sshd) -> usize {
    sshd.log().matches("Starting session: command").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_nvidia_smi_the_stream_ends_or_retries_by_gpus() {
    assert!(
        std::process::Command::new("sh")
            .args(["-c", "command -v nvidia-smi"])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true),
        "this test needs a host without nvidia-smi"
    );
    let dir = tempfile::tempdir().unwrap();
    let key = ManagementKey::generate();
    let sshd = Sshd::start(&[&key.public_line()]);
    let target = GuestTarget::new("vm-metrics", sshd.port, dir.path().join("known_host"));
    let session = Arc::new(GuestSession::new(target, key));
    let streams = GpuStreams::new(GuestGpuBoard::default());

    // No GPU in the instance: one try, then the stream ends by itself.
    streams.start(spec(&session, false), std::future::pending());
    wait_until("the stream to end", WAIT, Duration::from_millis(100), async || {
        let active = streams.active();
        if active.is_empty() { Ok(()) } else { Err(format!("{active:?}; sshd: {}", sshd.log())) }
    })
    .await;
    assert_eq!((logins(&sshd), commands(&sshd)), (1, 1), "{}", sshd.log());
    assert!(streams.board().fresh(Duration::from_secs(60)).is_empty());

    // GPUs in the instance: the driver may come later, so it tries again (with back-off),
    // each time on a new channel of the same connection.
    streams.start(spec(&session, true), std::future::pending());
    wait_until("three more tries", WAIT, Duration::from_millis(100), async || {
        if commands(&sshd) >= 4 { Ok(()) } else { Err(sshd.log()) }
    })
    .await;
    assert_eq!(logins(&sshd), 1, "one session for every try: {}", sshd.log());
    assert_eq!(streams.active(), ["vm-metrics"]);
    streams.stop("vm-metrics").await;
    assert!(streams.active().is_empty());

    // A stream also ends when its VM goes (here: a future that resolves at once).
    streams.start(spec(&session, true), async {});
    wait_until("the stream to end with its VM", WAIT, Duration::from_millis(50), async || {
        let active = streams.active();
        if active.is_empty() { Ok(()) } else { Err(format!("{active:?}")) }
    })
    .await;

    // A closed session (the VM stopped or boots again) ends a stream quietly.
    session.close().await;
    streams.start(spec(&session, true), std::future::pending());
    wait_until("the stream to end with its session", WAIT, Duration::from_millis(50), async || {
        let active = streams.active();
        if active.is_empty() { Ok(()) } else { Err(format!("{active:?}")) }
    })
    .await;
    assert_eq!(logins(&sshd), 1, "{}", sshd.log());
}
