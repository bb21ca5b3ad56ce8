//! The API server's limits against local processes that hold connections open: a silent or
//! slow connection is closed, a head too long is refused, and a flood of half-open
//! connections neither grows the agent's descriptors past the cap nor keeps a real request
//! out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

use crate::api::started;
use crate::support::wait::{wait_until, wait_until_blocking};

/// The agent's connection cap (`api::server::MAX_CONNECTIONS`).
const CAP: usize = 256;
/// Half-open connections held by the flood.
const FLOOD: usize = 3000;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Raises this process's descriptor limit to its hard limit (the flood needs thousands).
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// Reads until the peer closes (`Ok(bytes)`), within `limit`.
fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("the agent kept the connection open: {e}"),
        }
    }
}

#[tokio::test]
async fn silent_slow_and_oversized_requests_are_cut_off() {
    let (_dirs, agent, _api) = started().await;
    let address = format!("127.0.0.1:{}", agent.port);
    tokio::task::spawn_blocking(move || {
        // Connected, nothing sent: closed by the head deadline (10 s).
        let mut silent = TcpStream::connect(&address).unwrap();
        read_to_close(&mut silent, Duration::from_secs(60));

        // A head sent a byte at a time never completes in time.
        let mut slow = TcpStream::connect(&address).unwrap();
        let head = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        slow.write_all(head).unwrap();
        for _ in 0..30 {
            if slow.write_all(b"a").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        read_to_close(&mut slow, Duration::from_secs(60));

        // A head larger than the server's buffer is refused, not buffered.
        let mut big = TcpStream::connect(&address).unwrap();
        let filler = "a".repeat(64 * 1024);
        let request = format!("GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n");
        let _ = big.write_all(request.as_bytes());
        let answer =
            String::from_utf8_lossy(&read_to_close(&mut big, Duration::from_secs(60))).into_owned();
        assert!(!answer.starts_with("HTTP/1.1 200"), "a 64 KiB head was served: {answer}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_flood_of_half_open_connections_does_not_keep_the_control_plane_out() {
    let (dirs, agent, api) = started().await;
    let limit = raise_nofile();
    assert!(limit as usize > FLOOD + 100, "the descriptor limit {limit} is too low for the test");
    let baseline = open_fds(agent.pid());
    let address = format!("127.0.0.1:{}", agent.port);
    // Thousands of connections, each with half a request head, all held open.
    let flood = tokio::task::spawn_blocking(move || {
        let mut held = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            let Ok(mut stream) = TcpStream::connect(&address) else { continue };
            let _ = stream.write_all(b"GET /instances HTTP/1.1\r\nHost: x\r\n");
            held.push(stream);
        }
        held
    })
    .await
    .unwrap();
    assert!(flood.len() >= FLOOD / 2, "only {} connections were made", flood.len());

    // The agent never holds more than its cap…
    let pid = agent.pid();
    assert!(open_fds(pid) <= baseline + CAP + 8, "{} descriptors", open_fds(pid));
    // …and a real request still gets through while the flood is held.
    let status = wait_until(
        "an answer to GET /instances during the flood",
        Duration::from_secs(60),
        Duration::from_millis(200),
        async || {
            let answer = api.get("/instances").await;
            if answer.status == 200 { Ok(answer) } else { Err(format!("{answer:?}")) }
        },
    )
    .await;
    assert_eq!(status.body["data"]["status"], json!("destroyed"));
    assert!(open_fds(pid) <= baseline + CAP + 8, "{} descriptors", open_fds(pid));
    drop(flood);
    // Once the flood lets go, the agent is back to its baseline.
    wait_until_blocking(
        "the agent to let go of the flood",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let now = open_fds(pid);
            if now <= baseline + 2 {
                Ok(())
            } else {
                Err(format!("{now} descriptors, {baseline} before"))
            }
        },
    );
    let _ = dirs;
}
