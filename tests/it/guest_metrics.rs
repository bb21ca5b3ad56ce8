//! The in-guest GPU metrics stream against a real OpenSSH server whose host has no
//! `nvidia-smi` (as a guest without the NVIDIA driver): it ends quietly for an instance
//! without GPUs and keeps retrying for one with GPUs, until stopped. The data path (lines into
//! `/stats`) runs against the real VM in tests/it/gpu_guest.rs.

use std::time::Duration;

use qudata_agent::guest::metrics::{GpuStreams, GuestGpuBoard, StreamSpec};
use qudata_agent::guest::{GuestTarget, ManagementKey};

use crate::support::sshd::Sshd;
use crate::support::wait::wait_until;

const WAIT: Duration = Duration::from_secs(60);

fn spec(sshd: &Sshd, key: &ManagementKey, dir: &std::path::Path, has_gpus: bool) -> StreamSpec {
    StreamSpec {
        target: GuestTarget::new("vm-metrics", sshd.port, dir.join("known_host")),
        key: key.clone(),
        has_gpus,
        interval: Duration::from_millis(200),
    }
}

fn logins(sshd: &Sshd) -> usize {
    sshd.log().matches("Accepted publickey").count()
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
    let streams = GpuStreams::new(GuestGpuBoard::default());

    // No GPU in the instance: one try, then the stream ends by itself.
    streams.start(spec(&sshd, &key, dir.path(), false), std::future::pending());
    wait_until("the stream to end", WAIT, Duration::from_millis(100), async || {
        let active = streams.active();
        if active.is_empty() { Ok(()) } else { Err(format!("{active:?}; sshd: {}", sshd.log())) }
    })
    .await;
    assert_eq!(logins(&sshd), 1, "{}", sshd.log());
    assert!(streams.board().fresh(Duration::from_secs(60)).is_empty());

    // GPUs in the instance: the driver may come later, so it tries again (with back-off).
    streams.start(spec(&sshd, &key, dir.path(), true), std::future::pending());
    wait_until("three logins (retries)", WAIT, Duration::from_millis(100), async || {
        if logins(&sshd) >= 3 { Ok(()) } else { Err(sshd.log()) }
    })
    .await;
    assert_eq!(streams.active(), ["vm-metrics"]);
    streams.stop("vm-metrics").await;
    assert!(streams.active().is_empty());

    // A stream also ends when its VM goes (here: a future that resolves at once).
    streams.start(spec(&sshd, &key, dir.path(), true), async {});
    wait_until("the stream to end with its VM", WAIT, Duration::from_millis(50), async || {
        let active = streams.active();
        if active.is_empty() { Ok(()) } else { Err(format!("{active:?}")) }
    })
    .await;
}
