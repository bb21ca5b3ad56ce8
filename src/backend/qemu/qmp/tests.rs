//! The reader against a fake QMP peer on the other end of a socket pair.

use super::*;
use qapi_qmp::RunState;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, Lines};

const LIMIT: Duration = Duration::from_secs(5);

/// The QEMU side of the socket, scripted by each test.
struct Peer {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn recv(&mut self) -> Value {
        let line = timeout(LIMIT, self.lines.next_line()).await.unwrap().unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    }

    async fn send_raw(&mut self, text: &str) {
        self.writer.write_all(format!("{text}\r\n").as_bytes()).await.unwrap();
    }

    async fn send(&mut self, value: Value) {
        self.send_raw(&value.to_string()).await;
    }

    async fn reply(&mut self, command: &Value, result: Value) {
        self.send(json!({ "return": result, "id": command["id"] })).await;
    }
}

fn pair() -> (UnixStream, Peer) {
    let (client, peer) = UnixStream::pair().unwrap();
    let (read, writer) = peer.into_split();
    (client, Peer { lines: BufReader::new(read).lines(), writer })
}

fn greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""},
                   "capabilities": ["oob"]}})
}

/// A client past negotiation, with its peer.
async fn connected(call_timeout: Duration) -> (Arc<Qmp>, Peer) {
    let (client, mut peer) = pair();
    let handshake = tokio::spawn(Qmp::handshake(client, call_timeout));
    peer.send(greeting()).await;
    let negotiate = peer.recv().await;
    assert_eq!(negotiate["execute"], "qmp_capabilities");
    peer.reply(&negotiate, json!({})).await;
    (Arc::new(handshake.await.unwrap().unwrap()), peer)
}

/// Runs one call in its own task, so the test can play the peer meanwhile.
fn spawn_call<T, F>(qmp: &Arc<Qmp>, call: impl FnOnce(Arc<Qmp>) -> F) -> JoinHandle<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(call(qmp.clone()))
}

#[tokio::test]
async fn commands_are_framed_with_execute_arguments_and_id() {
    let (qmp, mut peer) = connected(LIMIT).await;
    let call = spawn_call(&qmp, |q| async move { q.query_status().await });
    let command = peer.recv().await;
    assert_eq!(command, json!({"execute": "query-status", "arguments": {}, "id": 2}));
    peer.reply(&command, json!({"running": false, "status": "prelaunch"})).await;
    let status = call.await.unwrap().unwrap();
    assert_eq!((status.running, status.status), (false, RunState::prelaunch));
}

#[tokio::test]
async fn unknown_events_fields_and_garbage_do_not_break_the_loop() {
    let (qmp, mut peer) = connected(LIMIT).await;
    let mut events = qmp.subscribe();
    let call = spawn_call(&qmp, |q| async move { q.query_status().await });
    let command = peer.recv().await;
    let ts = json!({"seconds": 1, "microseconds": 2});
    peer.send(json!({"event": "SOME_FUTURE_EVENT", "data": {"x": [1]}, "timestamp": ts})).await;
    peer.send_raw("this is not json").await;
    peer.send_raw("[1, 2]").await;
    peer.send(json!({"event": "STOP", "timestamp": ts})).await;
    let status = json!({"running": false, "status": "paused", "a-field-from-the-future": {}});
    peer.reply(&command, status).await;
    peer.send(json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}))
        .await;
    assert_eq!(call.await.unwrap().unwrap().status, RunState::paused);

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(timeout(LIMIT, events.recv()).await.unwrap().unwrap());
    }
    let shutdown = QmpEvent::Shutdown { guest: true, reason: "guest-shutdown".into() };
    assert_eq!(seen, [QmpEvent::Other("SOME_FUTURE_EVENT".into()), QmpEvent::Stop, shutdown]);

    let call = spawn_call(&qmp, |q| async move { q.cont().await });
    let command = peer.recv().await;
    peer.reply(&command, json!({})).await;
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn replies_are_matched_by_id_not_by_order() {
    let (qmp, mut peer) = connected(LIMIT).await;
    let status = spawn_call(&qmp, |q| async move { q.query_status().await });
    let first = peer.recv().await;
    let stop = spawn_call(&qmp, |q| async move { q.stop().await });
    let second = peer.recv().await;
    assert_eq!((&first["execute"], &second["execute"]), (&json!("query-status"), &json!("stop")));
    assert_ne!(first["id"], second["id"]);
    // Answer the later call first; a mix-up would hand `{}` to query-status and fail it.
    peer.reply(&second, json!({})).await;
    peer.reply(&first, json!({"running": true, "status": "running"})).await;
    stop.await.unwrap().unwrap();
    assert_eq!(status.await.unwrap().unwrap().status, RunState::running);
}

#[tokio::test]
async fn error_replies_carry_class_and_description() {
    let (qmp, mut peer) = connected(LIMIT).await;
    let call = spawn_call(&qmp, |q| async move { q.cont().await });
    let command = peer.recv().await;
    let desc = "Resetting the Virtual Machine is required";
    peer.send(json!({"error": {"class": "GenericError", "desc": desc}, "id": command["id"]})).await;
    let err = call.await.unwrap().unwrap_err();
    let expected =
        QmpError::Command { command: "cont", class: "GenericError".into(), desc: desc.into() };
    assert_eq!(err, expected);
    assert_eq!(err.to_string(), format!("QEMU refused cont: {desc} (GenericError)"));
}

#[tokio::test]
async fn a_reply_of_the_wrong_shape_is_a_decode_error() {
    let (qmp, mut peer) = connected(LIMIT).await;
    let call = spawn_call(&qmp, |q| async move { q.query_status().await });
    let command = peer.recv().await;
    peer.reply(&command, json!({"status": 7})).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, QmpError::Decode { command: "query-status", .. }), "{err}");
}

#[tokio::test]
async fn hang_up_fails_pending_and_later_calls() {
    let (qmp, mut peer) = connected(LIMIT).await;
    let call = spawn_call(&qmp, |q| async move { q.query_status().await });
    peer.recv().await;
    drop(peer);
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, QmpError::Disconnected { reason } if reason.contains("closed")),
        "{err}"
    );
    timeout(LIMIT, qmp.closed()).await.unwrap();
    assert!(qmp.is_closed());
    let err = qmp.stop().await.unwrap_err();
    assert!(matches!(err, QmpError::Disconnected { .. }), "{err}");
    // `quit` loses its reply to QEMU's exit; that is its success.
    qmp.quit().await.unwrap();
}

#[tokio::test]
async fn a_call_times_out_and_its_late_reply_is_dropped() {
    let (qmp, mut peer) = connected(Duration::from_millis(200)).await;
    let call = spawn_call(&qmp, |q| async move { q.query_status().await });
    let slow = peer.recv().await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err, QmpError::Timeout { command: "query-status", millis: 200 });

    let call = spawn_call(&qmp, |q| async move { q.stop().await });
    let next = peer.recv().await;
    peer.reply(&slow, json!({"running": true, "status": "running"})).await;
    peer.reply(&next, json!({})).await;
    call.await.unwrap().unwrap();
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn a_peer_that_is_not_qmp_is_refused() {
    let (client, mut peer) = pair();
    let handshake = tokio::spawn(Qmp::handshake(client, LIMIT));
    peer.send(json!({"hello": "world"})).await;
    let err = handshake.await.unwrap().err().unwrap();
    assert!(matches!(err, QmpError::Greeting { .. }), "{err}");

    let (client, _silent) = pair();
    let err = Qmp::handshake(client, Duration::from_millis(100)).await.err().unwrap();
    assert!(err.to_string().contains("none within 100 ms"), "{err}");
}

#[tokio::test]
async fn connect_names_the_socket_it_could_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let err = Qmp::connect(&path, LIMIT).await.err().unwrap();
    assert!(matches!(&err, QmpError::Connect { path: p, .. } if p == &path), "{err}");
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, hostile_text, json};

    const KEYS: &[&str] = &[
        "event",
        "data",
        "return",
        "error",
        "id",
        "status",
        "running",
        "guest",
        "reason",
        "class",
        "desc",
        "QMP",
        "timestamp",
        "action",
    ];

    proptest! {
        #![proptest_config(config())]

        /// Whatever QEMU (or a guest that took it over) writes on the monitor, a line is
        /// dispatched or ignored, and a reply only ever reaches the call it names.
        #[test]
        fn monitor_lines(message in json(KEYS), raw in hostile_text(), as_raw in any::<bool>()) {
            let inner = Arc::new(Inner {
                state: Mutex::new(State::default()),
                closed: watch::Sender::new(false),
            });
            let (tx, mut rx) = oneshot::channel();
            lock(&inner).pending.insert(7, tx);
            let (events, _keep) = broadcast::channel(16);
            let line = if as_raw { raw.into_bytes() } else { message.to_string().into_bytes() };
            dispatch(&line, &inner, &events);
            if let Ok(reply) = rx.try_recv() {
                prop_assert_eq!(reply.get("id").and_then(Value::as_u64), Some(7));
            }
        }
    }
}
