//! `QUDATA_DOCKER_PULL` end to end: the real agent, the test engine and a real registry
//! (Debian's `docker-registry`) on 127.0.0.1, allowed as a private registry. Images are
//! busybox with a `/version` file, pushed by the engine itself.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::docker::Engine;
use crate::support::docker_agent::{START, container, start_agent_with, wait_container_gone};
use crate::support::docker_images::busybox;
use crate::support::registry::Registry;
use crate::support::vm::{wait_gone, wait_status};

const FALLBACK: &str = "the registry cannot be reached; using the engine's copy of the image";

/// A busybox image with `/version` holding `version`; its id.
fn image_with_version(engine: &Engine, version: &str) -> String {
    let base = busybox(engine);
    let name = format!("qudata-build-{}", uuid::Uuid::new_v4().simple());
    let write = format!("echo {version} > /version");
    engine.must(&["run", "--name", &name, "--network", "none", base, "sh", "-c", &write]);
    let id = engine.must(&["commit", &name]);
    engine.must(&["rm", &name]);
    id
}

/// Tags `id` as `reference` in the engine and pushes it to the registry.
fn push(engine: &Engine, id: &str, reference: &str) {
    engine.must(&["tag", id, reference]);
    engine.must(&["push", reference]);
}

fn image_id(engine: &Engine, reference: &str) -> String {
    engine.must(&["image", "inspect", "-f", "{{.Id}}", reference])
}

/// The agent with `policy`, allowed to pull from `registry`.
async fn agent(engine: &Engine, registry: &Registry, policy: &str) -> (Dirs, Agent, Api) {
    let dirs = Dirs::new();
    let env = [
        ("QUDATA_DOCKER_PULL", policy.to_owned()),
        ("QUDATA_DOCKER_PRIVATE_REGISTRIES", registry.host()),
    ];
    let mut agent = start_agent_with(&dirs, engine, free_port(), &env);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    (dirs, agent, api)
}

async fn create(api: &Api, image: &str) -> String {
    let body = json!({"image": image, "cpus": 1, "memory": "256M", "command": "exec sleep 3600"});
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    created.body["data"]["id"].as_str().unwrap().to_owned()
}

/// Creates an instance of `image`, waits until it runs, and returns what its container runs:
/// the image id and its `/version`.
async fn run(engine: &Engine, api: &Api, image: &str) -> (String, String) {
    let id = create(api, image).await;
    wait_status(api, "running", START).await;
    let name = container(&id);
    let image_id = engine.inspect(&name, "{{.Image}}").unwrap();
    let version = engine.must(&["exec", &name, "cat", "/version"]);
    (id, format!("{image_id} {version}"))
}

async fn delete(engine: &Engine, dirs: &Dirs, api: &Api, id: &str) {
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(api, "destroyed", Duration::from_secs(60)).await;
    wait_container_gone(engine, id, Duration::from_secs(30));
    wait_gone(dirs, id, Duration::from_secs(30)).await;
}

/// What the agent logged about pulling `reference`: `pulling the image` lines and fallback
/// warnings.
fn pull_lines(agent: &Agent, reference: &str) -> (usize, Vec<String>) {
    let output = agent.output();
    let about = |l: &&str| l.contains(reference);
    // Not the error lines of a failed pull ("pulling the image … failed: …").
    let pull = |l: &&str| l.contains("pulling the image") && !l.contains(" failed");
    let pulls = output.lines().filter(about).filter(pull).count();
    let warnings = output.lines().filter(about).filter(|l| l.contains(FALLBACK));
    (pulls, warnings.map(str::to_owned).collect())
}

#[tokio::test]
async fn always_pulls_a_moved_tag_and_uses_the_engines_copy_only_when_the_registry_is_down() {
    let engine = Engine::shared();
    let mut registry = Registry::start();
    let reference = format!("{}/test/app:1", registry.host());
    let one = image_with_version(engine, "one");
    let two = image_with_version(engine, "two");
    push(engine, &one, &reference);
    let (dirs, agent, api) = agent(engine, &registry, "always").await;

    let (id, runs) = run(engine, &api, &reference).await;
    assert_eq!(runs, format!("{one} one"));
    delete(engine, &dirs, &api, &id).await;

    // The tag moves to `two` in the registry while the engine's copy stays `one`: only a pull
    // can bring `two`.
    push(engine, &two, &reference);
    engine.must(&["tag", &one, &reference]);
    assert_eq!(image_id(engine, &reference), one);
    let (id, runs) = run(engine, &api, &reference).await;
    assert_eq!(runs, format!("{two} two"), "the moved tag was not pulled");
    assert_eq!(pull_lines(&agent, &reference).0, 2, "one pull per create");
    assert!(pull_lines(&agent, &reference).1.is_empty());
    delete(engine, &dirs, &api, &id).await;

    // What pulling an image the engine has costs against this registry (README "Figures").
    let mut took: Vec<Duration> = (0..5)
        .map(|_| {
            let started = Instant::now();
            engine.must(&["pull", "-q", &reference]);
            started.elapsed()
        })
        .collect();
    took.sort();
    eprintln!("`docker pull` of a present image: median {:?}, {took:?}", took[2]);

    // The registry is down: the engine's copy runs, said once with the image and the reason.
    registry.stop();
    let (id, runs) = run(engine, &api, &reference).await;
    assert_eq!(runs, format!("{two} two"));
    let warnings = pull_lines(&agent, &reference).1;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("connection refused"), "{}", warnings[0]);
    delete(engine, &dirs, &api, &id).await;

    // A registry that answers no (here: it has no such manifest) is never overruled by the
    // engine's copy.
    registry.restart();
    let unknown = format!("{}/test/unpushed:1", registry.host());
    engine.must(&["tag", &one, &unknown]);
    let id = create(&api, &unknown).await;
    let failed = wait_status(&api, "error", START).await;
    let reason = failed["error"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("pulling the image {unknown} failed")), "{reason}");
    assert!(reason.contains("manifest unknown"), "{reason}");
    assert!(pull_lines(&agent, &unknown).1.is_empty(), "fell back after a refusal");
    assert!(engine.labelled(&format!("ai.qudata.instance={id}")).is_empty());
    delete(engine, &dirs, &api, &id).await;

    // Best effort: untagging the last name of an image already removed it.
    let _ = engine.cli(&["rmi", &reference, &unknown, &one, &two]);
}

#[tokio::test]
async fn missing_uses_the_engines_copy_and_pulls_only_an_image_it_lacks() {
    let engine = Engine::shared();
    let mut registry = Registry::start();
    let reference = format!("{}/test/app:1", registry.host());
    let one = image_with_version(engine, "one");
    push(engine, &one, &reference);
    let (dirs, agent, api) = agent(engine, &registry, "missing").await;

    // Present: the registry is not asked (it is not even running).
    registry.stop();
    let (id, runs) = run(engine, &api, &reference).await;
    assert_eq!(runs, format!("{one} one"));
    assert_eq!(pull_lines(&agent, &reference), (0, vec![]));
    delete(engine, &dirs, &api, &id).await;

    // Absent: the registry is asked, so with it down the create fails with its reason...
    engine.must(&["rmi", &reference]);
    let id = create(&api, &reference).await;
    let failed = wait_status(&api, "error", START).await;
    let reason = failed["error"].as_str().unwrap_or_default();
    assert!(reason.contains("connection refused"), "{reason}");
    delete(engine, &dirs, &api, &id).await;
    // ...and with it up the image is pulled.
    registry.restart();
    let (id, runs) = run(engine, &api, &reference).await;
    assert_eq!(runs, format!("{one} one"));
    assert_eq!(pull_lines(&agent, &reference).0, 2);
    delete(engine, &dirs, &api, &id).await;

    let _ = engine.cli(&["rmi", &reference]);
}
