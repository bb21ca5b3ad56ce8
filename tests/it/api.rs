//! The agent API through the real binary in local mode (PROTOCOL.md §2): authentication,
//! envelope, and a table of malformed and hostile requests, none of which creates anything.

use serde_json::{Value, json};

use crate::support::agent::{Agent, Answer, Api, Dirs, free_port, local_secret};

/// A local-mode agent, ready, and its API client.
pub(crate) async fn started() -> (Dirs, Agent, Api) {
    let dirs = Dirs::new();
    let mut agent = Agent::local(&dirs);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    (dirs, agent, api)
}

fn assert_error(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert!(answer.content_type.starts_with("application/json"), "{what}: {answer:?}");
    assert_eq!(answer.body["ok"], json!(false), "{what}: {answer:?}");
    let error = answer.body["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty() && !error.contains('\n'), "{what}: one sentence: {answer:?}");
}

#[tokio::test]
async fn auth_matrix() {
    let (_dirs, agent, api) = started().await;
    let anonymous = Api::new(&agent, None);
    let wrong = Api::new(&agent, Some("sk-wrong"));

    let ping = anonymous.get("/ping").await;
    assert_eq!((ping.status, ping.body.clone()), (200, json!({"ok": true})));

    let routes = [
        ("GET", "/instances"),
        ("POST", "/instances"),
        ("PUT", "/instances"),
        ("DELETE", "/instances"),
        ("POST", "/ssh"),
        ("DELETE", "/ssh"),
        ("GET", "/no-such-route"),
        ("POST", "/ping"),
        ("GET", "/instances/../etc/passwd"),
    ];
    for (method, path) in routes {
        let a = anonymous.call(method, path, None).await;
        assert_error(&a, 401, path);
        assert_eq!(a.body["error"], "missing X-Agent-Secret header");
        let w = wrong.call(method, path, None).await;
        assert_error(&w, 403, path);
        assert_eq!(w.body["error"], "invalid secret");
    }
    // An empty header is a wrong secret, not a missing one.
    let mut empty = anonymous.clone();
    empty.secret = Some(String::new());
    assert_error(&empty.get("/instances").await, 403, "empty secret");

    let ok = api.get("/instances").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, json!({"ok": true, "data": {"status": "destroyed"}}));
    assert_error(&api.get("/no-such-route").await, 404, "unknown route");
    assert_error(&api.call("PATCH", "/instances", None).await, 405, "wrong method");
    assert_error(&api.call("POST", "/ping", None).await, 405, "POST /ping");
}

/// Each case: method, path, raw body, expected status.
fn hostile_cases() -> Vec<(&'static str, &'static str, Vec<u8>, u16)> {
    let j = |v: Value| serde_json::to_vec(&v).unwrap();
    let port = |p: Value| j(json!({"ports": [{"container_port": p, "remote_port": 10001}]}));
    vec![
        ("POST", "/instances", b"".to_vec(), 400),
        ("POST", "/instances", b"{".to_vec(), 400),
        ("POST", "/instances", b"not json".to_vec(), 400),
        ("POST", "/instances", b"\xff\xfe".to_vec(), 400),
        ("POST", "/instances", j(json!([1, 2])), 400),
        ("POST", "/instances", j(json!("string")), 400),
        ("POST", "/instances", j(json!(null)), 400),
        ("POST", "/instances", port(json!(0)), 400),
        ("POST", "/instances", port(json!(70000)), 400),
        ("POST", "/instances", port(json!(-22)), 400),
        ("POST", "/instances", port(json!("22; rm -rf /")), 400),
        ("POST", "/instances", port(json!(1e3)), 400),
        (
            "POST",
            "/instances",
            j(json!({"ports": [{"container_port": 22}, {"container_port": 22}]})),
            400,
        ),
        (
            "POST",
            "/instances",
            j(json!({"ports": [{"container_port": 80, "remote_port": 9000},
                               {"container_port": 81, "remote_port": 9000}]})),
            400,
        ),
        ("POST", "/instances", j(json!({"ports": [{"container_port": 80, "proto": "udp"}]})), 400),
        ("POST", "/instances", j(json!({"ports": [{"container_port": 80, "proto": 1}]})), 400),
        ("POST", "/instances", j(json!({"ports": "22"})), 400),
        ("POST", "/instances", j(json!({"ports": [["22"]]})), 400),
        ("POST", "/instances", j(json!({"env_variables": {"A=B": "x"}})), 400),
        ("POST", "/instances", j(json!({"env_variables": {"PATH;id": "x"}})), 400),
        ("POST", "/instances", j(json!({"env_variables": {"A": "x\u{0}y"}})), 400),
        ("POST", "/instances", j(json!({"env_variables": {"A": ["x"]}})), 400),
        ("POST", "/instances", j(json!({"env_variables": "A=B"})), 400),
        ("POST", "/instances", j(json!({"command": "sleep 1\u{0}"})), 400),
        ("POST", "/instances", j(json!({"command": "a\nb"})), 400),
        ("POST", "/instances", j(json!({"command": ["ls"]})), 400),
        ("POST", "/instances", j(json!({"cpus": 0})), 400),
        ("POST", "/instances", j(json!({"cpus": 100000})), 400),
        ("POST", "/instances", j(json!({"cpus": "2; reboot"})), 400),
        ("POST", "/instances", j(json!({"memory": "1000000T"})), 400),
        ("POST", "/instances", j(json!({"memory": "-1G"})), 400),
        ("POST", "/instances", j(json!({"storage_gb": 0})), 400),
        ("POST", "/instances", j(json!({"storage_gb": 99999999})), 400),
        ("POST", "/instances", j(json!({"gpus": -1})), 400),
        ("POST", "/instances", j(json!({"ssh_enabled": "true"})), 400),
        ("POST", "/instances", j(json!({"tunnel_token": "../../etc"})), 400),
        ("POST", "/instances", j(json!({"image": "x".repeat(2000)})), 400),
        ("POST", "/instances", vec![b'{'; 70 * 1024], 413),
        (
            "POST",
            "/instances",
            {
                let mut big = b"{\"command\":\"".to_vec();
                big.extend(std::iter::repeat_n(b'a', 1024 * 1024));
                big.extend(b"\"}");
                big
            },
            413,
        ),
        ("PUT", "/instances", j(json!({"command": "explode"})), 400),
        ("PUT", "/instances", j(json!({"command": 1})), 400),
        ("PUT", "/instances", j(json!({})), 400),
        ("PUT", "/instances", b"start".to_vec(), 400),
        ("POST", "/ssh", j(json!({"ssh_pubkey": "not a key"})), 400),
        ("POST", "/ssh", j(json!({"ssh_pubkey": "ssh-ed25519 AAAA\nssh-rsa AAAA"})), 400),
        ("POST", "/ssh", j(json!({"ssh_pubkey": 5})), 400),
        ("POST", "/ssh", j(json!({})), 400),
        ("DELETE", "/ssh", j(json!({"ssh_pubkey": "command=\"sh\" ssh-ed25519 AAAA"})), 400),
        ("POST", "/instances/x", j(json!({})), 404),
        ("DELETE", "/ping", Vec::new(), 405),
    ]
}

#[tokio::test]
async fn hostile_requests_are_refused_and_create_nothing() {
    let (dirs, _agent, api) = started().await;
    let cases = hostile_cases();
    assert!(cases.len() >= 30);
    for (method, path, body, status) in cases {
        let what =
            format!("{method} {path} {}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        let answer = api.call(method, path, Some(body)).await;
        assert_error(&answer, status, &what);
    }
    assert!(dirs.records().is_empty(), "nothing was created: {:?}", dirs.records());
    let status = api.get("/instances").await;
    assert_eq!(status.body["data"], json!({"status": "destroyed"}));
}

#[tokio::test]
async fn requests_on_no_instance_answer_404_and_a_valid_create_says_why_it_cannot() {
    let (dirs, _agent, api) = started().await;
    assert_error(&api.call("DELETE", "/instances", None).await, 404, "delete");
    assert_error(&api.json("PUT", "/instances", &json!({"command": "start"})).await, 404, "start");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdj0ztsvqr9qxDpzEX9DHR4ZrCcGbiYfHqwMuX0MG0W";
    assert_error(&api.json("POST", "/ssh", &json!({"ssh_pubkey": key})).await, 404, "ssh");
    let create = api.json("POST", "/instances", &json!({"ssh_enabled": true})).await;
    assert_error(&create, 503, "create without a backend");
    assert!(dirs.records().is_empty());
}

/// `auto` with neither a base image nor a Docker engine: the host is not provisioned, so the
/// agent stops with one sentence naming what each backend lacks, before it serves anything.
#[test]
fn auto_with_no_usable_backend_stops_with_the_reason() {
    let dirs = Dirs::new();
    let env = [("QUDATA_BACKEND", "auto".to_owned())];
    let mut agent = Agent::start(&dirs, &["run", "--local"], &env, free_port());
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", agent.output());
    let output = agent.output();
    let line = output
        .lines()
        .find(|l| l.starts_with("qudata-agent: no backend can run on this host"))
        .unwrap_or_else(|| panic!("no reason line:\n{output}"));
    assert!(line.contains("base VM image") && line.contains("QUDATA_BASE_IMAGE"), "{line}");
    assert!(line.contains("docker: ") && line.contains("/nonexistent/docker.sock"), "{line}");
    assert!(dirs.records().is_empty());
}
