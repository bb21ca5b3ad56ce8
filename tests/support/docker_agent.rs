//! The real agent in local mode on the Docker backend, against a test engine.

use std::time::Duration;

use super::agent::{Agent, Api, Dirs, free_port, local_secret};
use super::docker::Engine;
use super::wait::wait_until_blocking;

/// Create → running for a local image on a busy 2-core machine, with room to spare.
pub const START: Duration = Duration::from_secs(120);

/// `qudata-agent run --local` with `QUDATA_BACKEND=docker` on `engine`.
pub fn start_agent(dirs: &Dirs, engine: &Engine, port: u16) -> Agent {
    start_agent_with(dirs, engine, port, &[])
}

/// [`start_agent`] with more settings.
pub fn start_agent_with(
    dirs: &Dirs,
    engine: &Engine,
    port: u16,
    extra: &[(&'static str, String)],
) -> Agent {
    // The test engine's data root is on the machine's file system: it may not limit disks.
    let mut env = vec![
        ("QUDATA_BACKEND", "docker".to_owned()),
        ("QUDATA_DOCKER_HOST", engine.host()),
        ("QUDATA_DOCKER_UNLIMITED_DISK", "true".to_owned()),
    ];
    env.extend_from_slice(extra);
    Agent::start(dirs, &["run", "--local"], &env, port)
}

/// A ready agent on a fresh port and its API client.
pub async fn started(engine: &Engine) -> (Dirs, Agent, Api) {
    let dirs = Dirs::new();
    let mut agent = start_agent(&dirs, engine, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    (dirs, agent, api)
}

pub fn container(id: &str) -> String {
    format!("qudata-{id}")
}

/// Waits until the engine has no container named for `id`.
pub fn wait_container_gone(engine: &Engine, id: &str, limit: Duration) {
    let what = format!("the container of {id} to go");
    wait_until_blocking(what, limit, Duration::from_millis(200), || {
        match engine.inspect(&container(id), "{{.State.Status}}") {
            None => Ok(()),
            Some(state) => Err(format!("still there, {state}")),
        }
    })
}

/// Connecting to `addr:port` fails (nothing listens there).
pub fn refused(addr: &str, port: u16) -> bool {
    let target = format!("{addr}:{port}").parse().unwrap();
    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err()
}
