//! Docker instances end to end: the real binary in local mode on `QUDATA_BACKEND=docker`, a
//! real engine (`dockerd` from Debian on a private socket), images imported from Debian
//! packages.

use std::time::Duration;

use serde_json::json;

use crate::support::agent::{Api, local_secret};
use crate::support::docker::Engine;
use crate::support::docker_agent::{
    START, container, refused, start_agent, start_agent_with, started, wait_container_gone,
};
use crate::support::docker_images::busybox;
use crate::support::vm::{host_port, http_get, record, wait_gone, wait_http, wait_status};

/// busybox httpd serving a page made from an environment value. The value is hostile on
/// purpose: it must arrive as data, never run.
fn web_body(image: &str) -> serde_json::Value {
    json!({
        "image": image,
        "cpus": 1,
        "memory": "256M",
        "storage_gb": 5,
        "ports": [{"container_port": 8080, "remote_port": 20000, "proto": "http"}],
        "command": "mkdir -p /srv && printf '%s\\n' \"$GREETING\" > /srv/index.html && exec httpd -f -p 8080 -h /srv",
        "env_variables": {"GREETING": "hello $(touch /tmp/pwned) `id` ';"}
    })
}

const GREETING: &str = "hello $(touch /tmp/pwned) `id` ';\n";

async fn create(api: &Api, body: &serde_json::Value) -> String {
    let created = api.json("POST", "/instances", body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    assert_eq!(created.body["data"]["status"], "pending");
    created.body["data"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn lifecycle_ports_env_command_and_cleanup() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let (dirs, agent, api) = started(engine).await;
    let id = create(&api, &web_body(image)).await;
    wait_status(&api, "running", START).await;
    let name = container(&id);

    // The disk limit: on the container where the engine's storage driver can enforce one
    // (overlay2 on xfs with pquota), else made without it and said once in the log.
    let storage = engine.inspect(&name, "{{json .HostConfig.StorageOpt}}").unwrap_or_default();
    let warned = agent.output().matches("storage_gb is not enforced for containers").count();
    let limited = storage.contains(r#""size":"5G""#);
    assert!(limited != (warned == 1), "StorageOpt {storage}, warned {warned} times");

    // What the engine was asked for: the label, init, the restart policy, limits, and the
    // published port on 127.0.0.1 only.
    let web = host_port(&dirs, &id, 8080);
    assert_eq!(
        engine.inspect(&name, "{{index .Config.Labels \"ai.qudata.instance\"}}"),
        Some(id.clone())
    );
    let owner = engine.inspect(&name, "{{index .Config.Labels \"ai.qudata.owner\"}}");
    assert_eq!(owner, Some(dirs.data.display().to_string()));
    assert_eq!(engine.inspect(&name, "{{.HostConfig.Init}}").as_deref(), Some("true"));
    assert_eq!(
        engine.inspect(&name, "{{.HostConfig.RestartPolicy.Name}}").as_deref(),
        Some("unless-stopped")
    );
    assert_eq!(engine.inspect(&name, "{{.HostConfig.NanoCpus}}").as_deref(), Some("1000000000"));
    assert_eq!(engine.inspect(&name, "{{.HostConfig.Memory}}").as_deref(), Some("268435456"));
    assert_eq!(
        engine.inspect(&name, "{{json .HostConfig.PortBindings}}").as_deref(),
        Some(
            format!("{{\"8080/tcp\":[{{\"HostIp\":\"127.0.0.1\",\"HostPort\":\"{web}\"}}]}}")
                .as_str()
        )
    );
    assert_eq!(
        engine.inspect(&name, "{{.HostConfig.DeviceRequests}}").as_deref(),
        Some("[]"),
        "no GPUs here"
    );
    // Hardening: no GPU even where nvidia is the default runtime, a process cap, fewer
    // capabilities, no privilege gain through setuid, logs that cannot fill the disk.
    let env = engine.inspect(&name, "{{json .Config.Env}}").unwrap_or_default();
    assert!(env.contains("NVIDIA_VISIBLE_DEVICES=void"), "{env}");
    assert_eq!(engine.inspect(&name, "{{.HostConfig.PidsLimit}}").as_deref(), Some("4096"));
    let dropped = engine.inspect(&name, "{{json .HostConfig.CapDrop}}").unwrap_or_default();
    for cap in ["NET_RAW", "MKNOD", "SETFCAP", "SETPCAP"] {
        assert!(dropped.contains(cap), "{cap} not dropped: {dropped}");
    }
    assert_eq!(
        engine.inspect(&name, "{{json .HostConfig.SecurityOpt}}").as_deref(),
        Some(r#"["no-new-privileges"]"#)
    );
    assert_eq!(
        engine.inspect(&name, "{{json .HostConfig.LogConfig}}").as_deref(),
        Some(r#"{"Type":"json-file","Config":{"max-file":"3","max-size":"10m"}}"#)
    );
    let no_raw = engine.cli(&["exec", &name, "ping", "-c", "1", "-W", "1", "127.0.0.1"]);
    assert!(!no_raw.status.success(), "raw sockets work without NET_RAW");

    // The command runs with the environment as data; the port answers on 127.0.0.1 and on no
    // other local address.
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, GREETING);
    assert!(refused("127.0.0.2", web), "the port must be bound to 127.0.0.1 only");
    let pwned = engine.cli(&["exec", &name, "test", "-e", "/tmp/pwned"]);
    assert!(!pwned.status.success(), "the hostile value ran");

    // stop pauses: the port accepts but nothing answers; start resumes.
    let put = |cmd: &str| json!({"command": cmd});
    assert_eq!(api.json("PUT", "/instances", &put("stop")).await.status, 200);
    wait_status(&api, "paused", Duration::from_secs(10)).await;
    assert_eq!(engine.inspect(&name, "{{.State.Paused}}").as_deref(), Some("true"));
    assert_eq!(http_get(web).await, None, "a paused container must not serve");
    assert_eq!(api.json("PUT", "/instances", &put("start")).await.status, 200);
    wait_status(&api, "running", Duration::from_secs(10)).await;
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, GREETING);

    // restart: a new run of the same container, reported as running again.
    let before = engine.inspect(&name, "{{.State.StartedAt}}").unwrap();
    assert_eq!(api.json("PUT", "/instances", &put("restart")).await.status, 200);
    wait_status(&api, "running", START).await;
    let after = engine.inspect(&name, "{{.State.StartedAt}}").unwrap();
    assert_ne!(before, after, "the container was not restarted");
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, GREETING);

    // Stopped behind the agent's back (the restart policy leaves it stopped) → error with the
    // exit code; `start` runs it again.
    engine.must(&["stop", "-t", "1", &name]);
    let failed = wait_status(&api, "error", Duration::from_secs(30)).await;
    let reason = failed["error"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("the container exited with code"), "reason: {reason}");
    assert_eq!(api.json("PUT", "/instances", &put("start")).await.status, 200);
    wait_status(&api, "running", START).await;
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, GREETING);

    // DELETE removes the container (and its anonymous volumes) and the record.
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(60)).await;
    wait_container_gone(engine, &id, Duration::from_secs(30));
    // The teardown finishes in the background: the record goes once the engine confirmed.
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
    assert!(dirs.records().is_empty(), "{:?}", dirs.records());
    assert!(refused("127.0.0.1", web), "the published port is closed");
}

#[tokio::test]
async fn a_command_that_fails_at_once_is_an_error_with_its_exit_code_and_output() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let (dirs, _agent, api) = started(engine).await;
    let body = json!({"image": image, "command": "echo last words; exit 3"});
    let id = create(&api, &body).await;
    let failed = wait_status(&api, "error", START).await;
    let reason = failed["error"].as_str().unwrap_or_default();
    assert!(reason.contains("last words"), "{reason}");
    assert!(reason.contains("exit"), "{reason}");
    // Seen failing during create it is rolled back; seen only by the watch (a slow machine
    // where the exit came after the settle time) the restart policy keeps trying until
    // DELETE. Either way DELETE leaves nothing.
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_container_gone(engine, &id, Duration::from_secs(30));
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_bad_image_is_an_error_with_the_engines_message_and_leaves_nothing() {
    use crate::support::agent::{Dirs, free_port};
    let engine = Engine::shared();
    // A registry on 127.0.0.1 that lacks the image: the pull never leaves the machine.
    let registry = crate::support::registry::Registry::start();
    let dirs = Dirs::new();
    let mirror = [("QUDATA_DOCKER_PRIVATE_REGISTRIES", registry.host())];
    let mut agent = start_agent_with(&dirs, engine, free_port(), &mirror);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let image = format!("{}/qudata-test/no-such-image:1", registry.host());
    let id = create(&api, &json!({ "image": image })).await;
    let failed = wait_status(&api, "error", START).await;
    let reason = failed["error"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("pulling the image {image} failed: ")), "{reason}");
    assert!(reason.contains("manifest unknown"), "{reason}");
    eprintln!("bad image: {reason}");
    assert!(engine.labelled(&format!("ai.qudata.instance={id}")).is_empty());
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(30)).await;
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
    // A request the backend cannot take at all is refused before anything starts.
    let refused_create = api.json("POST", "/instances", &json!({"image": "bad image"})).await;
    assert_eq!(refused_create.status, 400, "{:?}", refused_create.body);
    let missing = api.json("POST", "/instances", &json!({"cpus": 1})).await;
    assert_eq!(missing.status, 400, "{:?}", missing.body);
    assert!(missing.body["error"].as_str().unwrap().starts_with("image: is required"));
    assert!(dirs.records().is_empty());
}

#[tokio::test]
async fn ssh_on_an_image_without_sshd_or_package_manager_is_a_clear_error() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let (_dirs, _agent, api) = started(engine).await;
    let id =
        create(&api, &json!({"image": image, "ssh_enabled": true, "command": "sleep 3600"})).await;
    let failed = wait_status(&api, "error", START).await;
    assert_eq!(
        failed["error"],
        "set up SSH failed: the image has no SSH server and neither apt-get nor apk to install \
         one; use an image with openssh-server, or create the instance with ssh_enabled false"
    );
    wait_container_gone(engine, &id, Duration::from_secs(30));
}

#[tokio::test]
async fn agent_kill9_adopts_the_running_container_untouched() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let (dirs, mut agent, api) = started(engine).await;
    let id = create(&api, &web_body(image)).await;
    wait_status(&api, "running", START).await;
    let name = container(&id);
    let started_at = engine.inspect(&name, "{{.State.StartedAt}}").unwrap();
    let web = host_port(&dirs, &id, 8080);

    agent.kill9();
    assert_eq!(wait_http(web, Duration::from_secs(10)).await, GREETING, "serves without the agent");
    let mut agent = start_agent(&dirs, engine, agent.port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let data = wait_status(&api, "running", Duration::from_secs(60)).await;
    assert_eq!(data["id"], id.as_str());
    assert_eq!(engine.inspect(&name, "{{.State.StartedAt}}").unwrap(), started_at, "not restarted");
    assert_eq!(record(&dirs, &id)["backend"], "docker");

    // The adopted container is watched and commanded like before.
    let put = json!({"command": "stop"});
    assert_eq!(api.json("PUT", "/instances", &put).await.status, 200);
    wait_status(&api, "paused", Duration::from_secs(10)).await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(60)).await;
    wait_container_gone(engine, &id, Duration::from_secs(30));
}

#[tokio::test]
async fn the_registry_password_reaches_neither_a_log_nor_the_record() {
    use crate::support::agent::{Dirs, free_port};
    let engine = Engine::shared();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let body = json!({
        "image": "127.0.0.1:9/team/app:1",
        "registry": "127.0.0.1:9",
        "login": "renter",
        "password": password,
    });
    // A registry on the host is refused unless the operator allows it…
    let (_, refusing, api) = started(engine).await;
    let refused = api.json("POST", "/instances", &body).await;
    assert_eq!(refused.status, 400, "{:?}", refused.body);
    let error = refused.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("private network") && !error.contains(&password), "{error}");
    assert!(!refusing.output().contains(&password), "the password was logged");
    drop(refusing);
    // …as a mirror: then, with nothing listening on 127.0.0.1:9, the pull fails with the
    // engine's words.
    let dirs = Dirs::new();
    let mirror = [("QUDATA_DOCKER_PRIVATE_REGISTRIES", "127.0.0.1:9".to_owned())];
    let mut agent = start_agent_with(&dirs, engine, free_port(), &mirror);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let body = json!({
        "image": "127.0.0.1:9/team/app:1",
        "registry": "127.0.0.1:9",
        "login": "renter",
        "password": password,
    });
    let id = create(&api, &body).await;
    let failed = wait_status(&api, "error", START).await;
    let reason = failed["error"].as_str().unwrap_or_default();
    assert!(reason.contains("pulling the image 127.0.0.1:9/team/app:1 failed"), "{reason}");
    let record = std::fs::read_to_string(dirs.data.join("instances").join(format!("{id}.json")));
    assert!(!record.unwrap().contains(&password), "the password was persisted");
    assert!(!agent.output().contains(&password), "the password was logged");
    assert!(!reason.contains(&password));
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(30)).await;
}

/// `storage_gb` is a promise: where the engine cannot keep it (decided by asking the engine
/// itself for a container with a disk limit), a create is refused with 400 and nothing is
/// made, unless the operator allowed containers without a limit.
#[tokio::test]
async fn a_disk_limit_the_engine_cannot_enforce_is_refused_unless_the_operator_allows_it() {
    use crate::support::agent::{Agent, Dirs, free_port};
    let engine = Engine::shared();
    let image = busybox(engine);
    let probe = engine.cli(&["create", "--storage-opt", "size=1G", image, "true"]);
    let can_limit = probe.status.success();
    if can_limit {
        let id = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
        engine.must(&["rm", &id]);
    }
    let dirs = Dirs::new();
    let env = [("QUDATA_BACKEND", "docker".to_owned()), ("QUDATA_DOCKER_HOST", engine.host())];
    let mut agent = Agent::start(&dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let answer = api.json("POST", "/instances", &web_body(image)).await;
    if can_limit {
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let id = answer.body["data"]["id"].as_str().unwrap().to_owned();
        assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
        wait_container_gone(engine, &id, START);
        return;
    }
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    let error = answer.body["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("storage_gb: ") && error.contains("QUDATA_DOCKER_UNLIMITED_DISK"),
        "{error}"
    );
    assert!(dirs.records().is_empty(), "a refused create left a record");
}
