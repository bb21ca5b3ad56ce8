//! The Docker backend against the engine itself: orphans found and reaped by label (and
//! nothing else touched), and an engine that stops mid-run and comes back.

use std::time::Duration;

use qudata_agent::backend::docker::{DockerBackend, DockerSettings};
use qudata_agent::backend::{HostSweeper, Owned};
use serde_json::json;

use crate::support::agent::{Api, Dirs, free_port, local_secret, recover_command};
use crate::support::docker::Engine;
use crate::support::docker_agent::{START, container, start_agent, started, wait_container_gone};
use crate::support::docker_images::busybox;
use crate::support::vm::{
    host_port, record, wait_gone, wait_http, wait_status, wait_status_after_error,
};

#[tokio::test]
async fn orphans_are_found_and_reaped_by_label_and_foreign_containers_are_left_alone() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let owner = tempfile::tempdir().unwrap().path().display().to_string();
    let orphan_id = uuid::Uuid::new_v4().to_string();
    let label = format!("ai.qudata.instance={orphan_id}");
    let mine = format!("ai.qudata.owner={owner}");
    let orphan = container(&orphan_id);
    let run = |name: &str, labels: &[&str]| {
        let mut args = vec!["run", "-d", "--init", "--name", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend([image, "sleep", "600"]);
        engine.must(&args);
    };
    run(&orphan, &[&label, &mine]);
    // Named like an instance, but without the labels: never the agent's.
    let foreign = container(&uuid::Uuid::new_v4().to_string());
    run(&foreign, &[]);
    // Another agent's instance (another data dir) on the same engine.
    let theirs_id = uuid::Uuid::new_v4().to_string();
    let theirs = container(&theirs_id);
    run(&theirs, &[&format!("ai.qudata.instance={theirs_id}"), "ai.qudata.owner=/elsewhere"]);

    let (sink, _events) = tokio::sync::mpsc::unbounded_channel();
    let settings = DockerSettings::new(engine.socket.clone(), owner.clone());
    let backend = DockerBackend::connect(settings, sink).await.expect("engine answers");
    let owned = backend.find_owned().await.unwrap();
    let mine: Vec<&Owned> = owned.iter().filter(|o| o.instance_id == orphan_id).collect();
    assert_eq!(mine.len(), 1, "{owned:?}");
    assert!(mine[0].what.starts_with("container "), "{:?}", mine[0]);
    assert_eq!(owned.len(), 1, "only this agent's: {owned:?}");

    backend.reap(mine[0]).await.unwrap();
    assert_eq!(engine.inspect(&orphan, "{{.Id}}"), None, "the orphan is gone");
    backend.reap(mine[0]).await.expect("reaping again is fine");
    for other in [&foreign, &theirs] {
        assert_eq!(engine.inspect(other, "{{.State.Running}}").as_deref(), Some("true"));
        engine.must(&["rm", "-f", other]);
    }
}

#[tokio::test]
async fn an_engine_that_stops_mid_run_is_an_error_and_the_instance_recovers_when_it_is_back() {
    let engine = Engine::start_new();
    let image = busybox(&engine);
    let (dirs, _agent, api) = started(&engine).await;
    let body = json!({
        "image": image,
        "ports": [{"container_port": 8080, "remote_port": 20000, "proto": "http"}],
        "command": "mkdir -p /srv && echo up > /srv/index.html && exec httpd -f -p 8080 -h /srv"
    });
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_status(&api, "running", START).await;
    let web = host_port(&dirs, &id, 8080);
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, "up\n");

    engine.stop();
    let down = wait_status(&api, "error", Duration::from_secs(60)).await;
    let reason = down["error"].as_str().unwrap_or_default();
    // Usually "does not answer" (naming the socket); a poll that caught the engine
    // mid-shutdown may read another engine error. Each says what happens next.
    assert!(reason.starts_with("the Docker engine"), "{reason}");
    if reason.contains("does not answer") {
        assert!(reason.contains(&engine.host()), "names the socket: {reason}");
    }
    assert!(reason.ends_with("the container runs again when the engine is back"), "{reason}");
    let stop = api.json("PUT", "/instances", &json!({"command": "stop"})).await;
    assert_eq!(stop.status, 409, "{:?}", stop.body);

    // Back: the engine restarts the container (unless-stopped) and the agent sees it run.
    engine.start();
    wait_status_after_error(&api, "running", START).await;
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, "up\n");
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(60)).await;
    wait_container_gone(&engine, &id, Duration::from_secs(60));
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
    assert!(dirs.records().is_empty(), "{:?}", dirs.records());
}

/// A running container labelled as an instance of the agent on `dirs` that has no record:
/// its instance id and container name.
fn orphan_container(engine: &Engine, dirs: &Dirs, image: &str) -> (String, String) {
    let orphan_id = uuid::Uuid::new_v4().to_string();
    let orphan = container(&orphan_id);
    let labels = [
        format!("ai.qudata.instance={orphan_id}"),
        format!("ai.qudata.owner={}", dirs.data.display()),
    ];
    engine.must(&[
        "run", "-d", "--name", &orphan, "--label", &labels[0], "--label", &labels[1], image,
        "sleep", "600",
    ]);
    (orphan_id, orphan)
}

#[tokio::test]
async fn the_agent_reaps_its_orphan_containers_at_start_up_and_nothing_else() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let dirs = Dirs::new();
    let (_, orphan) = orphan_container(engine, &dirs, image);
    let foreign = container(&uuid::Uuid::new_v4().to_string());
    engine.must(&["run", "-d", "--name", &foreign, image, "sleep", "600"]);

    let mut agent = start_agent(&dirs, engine, free_port());
    agent.wait_ready().await; // start-up recovery runs before the API serves
    assert_eq!(engine.inspect(&orphan, "{{.Id}}"), None, "the orphan is reaped");
    assert_eq!(engine.inspect(&foreign, "{{.State.Running}}").as_deref(), Some("true"));
    engine.must(&["rm", "-f", &foreign]);
}

#[tokio::test]
async fn recover_lists_then_reaps_orphan_containers() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let dirs = Dirs::new();
    let (orphan_id, orphan) = orphan_container(engine, &dirs, image);
    let recover = |args: &[&str]| {
        recover_command(&dirs)
            .args(args)
            .env("QUDATA_BACKEND", "docker")
            .env("QUDATA_DOCKER_HOST", engine.host())
            .output()
            .unwrap()
    };
    let dry = recover(&["--dry-run"]);
    let listing = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success(), "{listing}{}", String::from_utf8_lossy(&dry.stderr));
    assert!(listing.contains(&orphan_id), "{listing}");
    assert!(engine.inspect(&orphan, "{{.Id}}").is_some(), "a dry run touches nothing");
    let done = recover(&[]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(engine.inspect(&orphan, "{{.Id}}"), None, "recover reaps the orphan");
}

/// Host maintenance with containers: `recover --stop-all` stops the instance's container but
/// keeps it (and the record, in `error`); the agent started again runs it on `start`.
#[tokio::test]
async fn stop_all_stops_a_container_and_start_runs_it_again() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let (dirs, mut agent, api) = started(engine).await;
    let body = json!({"image": image, "command": "exec sleep 3600"});
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_status(&api, "running", START).await;
    let name = container(&id);
    engine.must(&["exec", &name, "sh", "-c", "echo kept > /kept"]);
    let container_id = engine.inspect(&name, "{{.Id}}").unwrap();
    assert!(agent.terminate().success(), "SIGTERM leaves the container running");

    let out = recover_command(&dirs)
        .args(["--stop-all", "--json"])
        .env("QUDATA_BACKEND", "docker")
        .env("QUDATA_DOCKER_HOST", engine.host())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!report.contains("\"failed\""), "{report}");
    assert_eq!(engine.inspect(&name, "{{.State.Running}}").as_deref(), Some("false"));
    let record = record(&dirs, &id);
    assert_eq!(record["status"], "error", "{record}");

    let mut agent = start_agent(&dirs, engine, agent.port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let data = wait_status(&api, "error", Duration::from_secs(30)).await;
    assert!(data["error"].as_str().unwrap().contains("host maintenance"), "{data}");
    let start = api.json("PUT", "/instances", &json!({"command": "start"})).await;
    assert_eq!(start.status, 200, "{:?}", start.body);
    wait_status(&api, "running", START).await;
    assert_eq!(engine.inspect(&name, "{{.Id}}").unwrap(), container_id, "the same container");
    let kept = engine.must(&["exec", &name, "cat", "/kept"]);
    assert_eq!(kept, "kept", "its writable layer kept");
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_container_gone(engine, &id, Duration::from_secs(60));
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
}
