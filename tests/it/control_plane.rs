//! The real binary in production mode against a mock control plane (PROTOCOL.md §1):
//! registration order and headers, a control plane that is down, restarts, and no credential
//! in any log. The stats loop has its own file (control_plane_stats.rs).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;

use crate::support::agent::{Agent, Api, Dirs, free_port, log_dir};
use crate::support::mock_cp::{Behaviour, MockCp, api_key, count, issued_secrets_file, ok_stats};

const WAIT: Duration = Duration::from_secs(60);
const STATS_KEYS: [&str; 8] =
    ["cpu_util", "gpu_temp", "gpu_util", "inet_in", "inet_out", "mem_util", "ram_util", "status"];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("a JSON object").keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Every file the agent keeps in its data dir is private (they hold the secret and FRP token).
fn assert_private_files(dirs: &Dirs) {
    let mut seen = 0;
    for entry in std::fs::read_dir(&dirs.data).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?}", entry.file_name());
            seen += 1;
        }
    }
    assert!(seen >= 3, "identity, secret and FRP files expected, saw {seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn registers_in_order_with_compat_bodies_and_headers() {
    let cp = MockCp::start(Behaviour::default());
    let key = api_key();
    let dirs = Dirs::new();
    let port = free_port();
    let mut agent = Agent::start(&dirs, &["run"], &cp.agent_env(&key, 200), port);
    agent.wait_ready().await;
    let reqs = cp.until("three samples", WAIT, |r| ok_stats(r).len() >= 3).await;

    let first = |path: &str| reqs.iter().position(|r| r.path == path).unwrap();
    assert!(first("/ping") < first("/init"), "{reqs:#?}");
    assert!(first("/init") < first("/init/host"), "{reqs:#?}");
    assert!(first("/init/host") < first("/stats"), "{reqs:#?}");
    let secret = cp.only_secret();
    for r in &reqs {
        assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
        match r.path.as_str() {
            "/ping" | "/init" => {
                assert_eq!(r.header("x-api-key"), Some(key.as_str()), "{}", r.path);
                assert_eq!(r.header("x-agent-secret"), None, "{}", r.path);
            }
            "/init/host" | "/stats" => {
                assert_eq!(r.header("x-agent-secret"), Some(secret.as_str()), "{}", r.path);
                assert_eq!(r.header("x-api-key"), None, "{}", r.path);
            }
            other => panic!("unexpected request to {other}"),
        }
    }
    assert_eq!(reqs[first("/ping")].method, "GET");

    let init = &reqs[first("/init")].body;
    // `backend` is sent only when one can run here (a Docker engine on the standard socket).
    let mut sent = keys(init);
    if let Some(backend) = init.get("backend") {
        assert!(backend == "qemu" || backend == "docker", "{init}");
        sent.remove("backend");
    }
    assert_eq!(
        sent,
        set(&["address", "agent_id", "agent_port", "fingerprint", "gpus", "pid", "version"]),
        "no test_mode unless true: {init}"
    );
    assert_eq!(init["gpus"], 0, "this host offers no GPU");
    let id = uuid::Uuid::parse_str(init["agent_id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(init["agent_port"], port);
    assert_eq!(init["address"], "203.0.113.7");
    assert_eq!(init["pid"], agent.pid());
    assert_eq!(init["version"], env!("CARGO_PKG_VERSION"));
    assert!(!init["fingerprint"].as_str().unwrap().is_empty());

    let host = &reqs[first("/init/host")].body;
    assert_eq!(
        keys(host),
        set(&["configuration", "gpu_amount", "gpu_name", "location", "max_cuda", "vram"])
    );
    assert_eq!(keys(&host["location"]), set(&["city", "country", "region"]));
    assert_eq!(
        keys(&host["configuration"]),
        set(&[
            "capacity",
            "cpu_cores",
            "cpu_freq",
            "cpu_name",
            "disk",
            "ethernet_in",
            "ethernet_out",
            "max_cuda_version",
            "memory_speed",
            "ram"
        ])
    );
    assert_eq!(host["configuration"]["ram"]["unit"], "gb");
    assert!(host["configuration"]["cpu_cores"].as_u64().unwrap() >= 1, "{host}");
    assert!(host["configuration"]["ram"]["amount"].as_f64().unwrap() > 0.0, "{host}");
    assert!(host["configuration"]["disk"]["amount"].as_f64().unwrap() > 0.0, "{host}");
    // No GPU on this machine: one warning names the GPU fields sent empty.
    let output = agent.output();
    let gaps: Vec<&str> = output.lines().filter(|l| l.contains("GPU facts unknown")).collect();
    assert_eq!(gaps.len(), 1, "{output}");
    assert!(gaps[0].contains("gpu_name, gpu_amount, vram, max_cuda"), "{output}");

    for s in ok_stats(&reqs) {
        assert_eq!(keys(&s.body), set(&STATS_KEYS), "{}", s.body);
        assert_eq!(s.body["status"], "destroyed");
        let cpu = s.body["cpu_util"].as_f64().unwrap();
        let ram = s.body["ram_util"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&cpu) && ram > 0.0 && ram <= 100.0, "{}", s.body);
    }

    // The secret /init gave opens the agent API; anything else does not.
    let with = Api::new(&agent, Some(&secret)).get("/instances").await;
    assert_eq!((with.status, &with.body["data"]["status"]), (200, &Value::from("destroyed")));
    assert_eq!(Api::new(&agent, None).get("/instances").await.status, 401);
    assert_eq!(Api::new(&agent, Some("sk-wrong")).get("/instances").await.status, 403);
    let stored = std::fs::read_to_string(dirs.data.join("agent-secret")).unwrap();
    assert_eq!(stored.trim(), secret);
    assert_private_files(&dirs);
    assert!(agent.terminate().success(), "SIGTERM is a clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_that_is_down_is_waited_for_with_the_api_closed() {
    let cp = MockCp::start(Behaviour { down: true, ..Default::default() });
    let dirs = Dirs::new();
    let mut agent = Agent::start(&dirs, &["run"], &cp.agent_env(&api_key(), 200), free_port());
    agent.wait_ready().await;
    let closed = Api::new(&agent, Some("sk-guess")).get("/instances").await;
    assert_eq!(closed.status, 503, "fail closed without a secret: {closed:?}");
    assert_eq!(closed.body["ok"], false);

    let reqs = cp.until("three /ping tries", WAIT, |r| count(r, "/ping") >= 3).await;
    assert_eq!(count(&reqs, "/init"), 0, "no /init before /ping succeeds");
    assert_eq!(count(&reqs, "/stats"), 0, "no /stats before /init");
    agent.wait_ready().await; // still alive and serving

    cp.set_down(false);
    cp.until("registration and a sample", WAIT, |r| !ok_stats(r).is_empty()).await;
    let secret = cp.only_secret();
    let open = Api::new(&agent, Some(&secret)).get("/instances").await;
    assert_eq!(open.status, 200, "{open:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_and_restart_keep_id_port_and_the_stored_secret() {
    let cp = MockCp::start(Behaviour::default());
    let key = api_key();
    let dirs = Dirs::new();
    // No QUDATA_AGENT_PORT: the agent picks its port once and keeps it.
    let mut env = cp.agent_env(&key, 200);
    env.push(("QUDATA_AGENT_PORT", String::new()));
    let mut agent = Agent::start(&dirs, &["run"], &env, 0);
    let reqs = cp.until("first registration", WAIT, |r| !ok_stats(r).is_empty()).await;
    let init = reqs.iter().find(|r| r.path == "/init").unwrap().body.clone();
    let port = init["agent_port"].as_u64().unwrap() as u16;
    agent.port = port;
    agent.wait_ready().await;
    let secret = cp.only_secret();
    agent.kill9();

    // Next start: the control plane knows the host and sends no new secret; it is also down
    // for a while, and the stored secret must open the API before it answers.
    cp.set(|b| {
        b.empty_secret = true;
        b.host_exists = true;
        b.down = true;
    });
    let before = cp.requests().len();
    let mut agent = Agent::start(&dirs, &["run"], &env, 0);
    agent.port = port;
    agent.wait_ready().await;
    let early = Api::new(&agent, Some(&secret)).get("/instances").await;
    assert_eq!(early.status, 200, "stored secret serves at once: {early:?}");

    cp.set_down(false);
    let reqs = cp.until("re-registration", WAIT, |r| !ok_stats(&r[before..]).is_empty()).await;
    let again = &reqs[before..];
    let init2 = &again.iter().find(|r| r.path == "/init" && r.answered == 200).unwrap().body;
    assert_eq!(init2["agent_id"], init["agent_id"]);
    assert_eq!(init2["agent_port"], init["agent_port"]);
    assert_eq!(count(again, "/init/host"), 0, "host_exists: true");
    for s in ok_stats(again) {
        assert_eq!(s.header("x-agent-secret"), Some(secret.as_str()));
    }
    assert_eq!(cp.only_secret(), secret, "the empty secret_key kept the stored one");
    assert_private_files(&dirs);
}

/// Runs an agent through registration and telemetry, then scans every agent log this test run
/// wrote so far (this module's and those that ran before it) for any key, secret or token
/// issued; tests/run-all.sh scans every log of the run once all tests are done.
#[tokio::test(flavor = "multi_thread")]
async fn zz_no_issued_credential_appears_in_any_agent_log() {
    let cp = MockCp::start(Behaviour::default());
    let dirs = Dirs::new();
    // Every library's most verbose level too: none may print a header or a body.
    let mut env = cp.agent_env(&api_key(), 100);
    env.push(("RUST_LOG", "trace".to_owned()));
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    cp.until("registration and samples", WAIT, |r| ok_stats(r).len() >= 3).await;
    let secret = cp.only_secret();
    assert_eq!(Api::new(&agent, Some(&secret)).get("/instances").await.status, 200);
    agent.terminate();

    let issued = std::fs::read_to_string(issued_secrets_file()).unwrap();
    let values: BTreeSet<&str> = issued.lines().filter(|l| l.len() >= 8).collect();
    assert!(values.len() >= 3, "key, secret and FRP token recorded");
    let mut scanned = 0;
    for entry in std::fs::read_dir(log_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        for value in &values {
            assert!(
                !text.contains(value),
                "{} leaks a credential issued by the mock",
                path.display()
            );
        }
        scanned += 1;
    }
    assert!(scanned >= 1);
}
