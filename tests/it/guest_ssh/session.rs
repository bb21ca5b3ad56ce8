//! The guest's one SSH session (`GuestSession`) against a real OpenSSH server: readiness,
//! commands and a long-lived stream share one login; a broken connection is made again on
//! the shared back-off; a closed session ends its channels and answers `SessionClosed`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use qudata_agent::guest::{GuestCommand, GuestError, GuestSession, GuestTarget, ManagementKey};
use tokio::time::Instant;

use crate::support::sshd::Sshd;
use crate::support::wait::wait_until;

fn logins(sshd: &Sshd) -> usize {
    sshd.log().matches("Accepted publickey").count()
}

fn session(sshd: &Sshd, key: &ManagementKey, dir: &tempfile::TempDir) -> GuestSession {
    let target = GuestTarget::new("vm-session", sshd.port, dir.path().join("known_host"));
    GuestSession::new(target, key.clone())
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_commands_and_a_stream_share_one_login() {
    let (dir, key) = (tempfile::tempdir().unwrap(), ManagementKey::generate());
    let sshd = Sshd::start(&[&key.public_line()]);
    let session = session(&sshd, &key, &dir);

    let ready = session.connect_until(soon()).await.unwrap();
    let stream = ready.open_stream(&GuestCommand::fixed("exec sleep 60"), soon()).await.unwrap();
    // Commands from several callers at once, while the stream's channel stays open.
    let runs = ["echo 0", "echo 1", "echo 2", "echo 3"].map(|command| {
        let session = &session;
        async move {
            let client = session.get().await.unwrap();
            client.run("echo", &GuestCommand::fixed(command), b"").await.unwrap().stdout
        }
    });
    let outs = futures_util::future::join_all(runs).await;
    assert_eq!(outs, [b"0\n".to_vec(), b"1\n".to_vec(), b"2\n".to_vec(), b"3\n".to_vec()]);
    assert!(Arc::ptr_eq(&ready, &session.get().await.unwrap()), "the same connection");
    assert_eq!(logins(&sshd), 1, "{}", sshd.log());

    // Closed (the VM stopped): the stream's channel ends, and nobody connects again.
    let mut stream = stream;
    session.close().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = stream.wait().await {
            if matches!(msg, russh::ChannelMsg::Close) {
                break;
            }
        }
    });
    assert!(ended.await.is_ok(), "the stream's channel outlived its session");
    for err in [session.get().await.err(), session.connect_until(soon()).await.err()] {
        assert!(matches!(err, Some(GuestError::SessionClosed { .. })), "{err:?}");
    }
    assert_eq!(logins(&sshd), 1, "{}", sshd.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_connection_is_made_again_on_next_use() {
    let (dir, key) = (tempfile::tempdir().unwrap(), ManagementKey::generate());
    let sshd = Sshd::start(&[&key.public_line()]);
    let session = session(&sshd, &key, &dir);
    let first = session.get().await.unwrap();
    // The server side of this connection goes (as when a guest reboots).
    let _ = first.exec(&GuestCommand::fixed("kill -KILL $PPID"), b"").await;
    let limit = Duration::from_secs(30);
    wait_until("the connection to close", limit, Duration::from_millis(50), async || {
        if first.is_closed() { Ok(()) } else { Err("still open".to_owned()) }
    })
    .await;
    let second = session.get().await.unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(second.exec(&GuestCommand::fixed("true"), b"").await.unwrap().success());
    assert_eq!(logins(&sshd), 2, "{}", sshd.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_back_off_and_are_shared_by_all_callers() {
    // A server that hangs up at once: every handshake fails, none for good.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let target = GuestTarget::new("vm-down", port, dir.path().join("known_host"));
    let session = GuestSession::new(target, ManagementKey::generate());

    // Three callers for 3.4 s: tries at 0 s, after 0.5-1 s, then 1-2 s (4th at 3.5 s at the
    // earliest); readiness polling would have made about seven, three callers each 21.
    let window = Duration::from_millis(3400);
    let callers = (0..3).map(|_| tokio::time::timeout(window, session.get()));
    for result in futures_util::future::join_all(callers).await {
        assert!(result.is_err(), "nothing to connect to");
    }
    let tries = accepted.load(Ordering::SeqCst);
    assert!((2..=3).contains(&tries), "{tries} tries");
    assert!(!dir.path().join("known_host").exists());
    server.abort();
}
