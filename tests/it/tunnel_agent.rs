//! The real agent binary and the frpc stand-in (PROTOCOL.md §3): the agent's own proxy runs
//! after registration; after `kill -9` of the agent the next one adopts the same frpc; new
//! credentials from `/init` restart it; it starts from the environment's credentials while the
//! control plane is down; without credentials one line says so; `run --local` never starts it. Instance publishing is covered by the manager's unit tests (no VM image
//! can exist in a temp dir, so creates answer 503 here).

use std::path::{Path, PathBuf};
use std::time::Duration;

use qudata_agent::tunnel::config::{ClientConfig, agent_proxy_name};
use qudata_agent::tunnel::{AdminClient, ProxyStatus};

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::frpc::{TEST_TOKEN, standin};
use crate::support::mock_cp::{Behaviour, MockCp, api_key, count, ok_stats, remember_secret};
use crate::support::wait::wait_until;

const WAIT: Duration = Duration::from_secs(60);

fn frpc_config(dirs: &Dirs) -> PathBuf {
    dirs.root.path().join("etc/frpc.toml")
}

fn env_with_standin(
    dirs: &Dirs,
    mut env: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    env.push(("QUDATA_FRPC_BINARY", standin().display().to_string()));
    env.push(("QUDATA_FRPC_CONFIG", frpc_config(dirs).display().to_string()));
    env
}

/// Kills the frpc (stand-in) the agents of a test left behind, by the process group it runs in.
struct FrpcReaper(PathBuf);

impl Drop for FrpcReaper {
    fn drop(&mut self) {
        for pid in frpc_processes(&self.0) {
            // SAFETY: plain syscall on the process group of an frpc this test's agent started.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}

/// Pids of processes whose command line names `config` (frpc is started with `-c <config>`).
fn frpc_processes(config: &Path) -> Vec<u32> {
    let want = config.as_os_str().as_encoded_bytes();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie =
                stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && cmdline.split(|&b| b == 0).any(|arg| arg == want)
        })
        .collect();
    pids.sort();
    pids
}

fn pidfile(dirs: &Dirs) -> Option<u32> {
    std::fs::read_to_string(dirs.run.join("frpc.pid")).ok()?.trim().parse().ok()
}

/// The proxies frpc reports now, asked with the admin credentials of the main file.
async fn proxies(config: &Path) -> Option<Vec<ProxyStatus>> {
    let text = std::fs::read_to_string(config).ok()?;
    let main: ClientConfig = toml::from_str(&text).ok()?;
    let status = AdminClient::new(&main.web_server).status().await.ok()?;
    Some(status.into_values().collect())
}

/// Waits (deadline 60 s) until a proxy `matches` and is `running`.
async fn running_proxy(
    config: &Path,
    what: &str,
    matches: impl Fn(&ProxyStatus) -> bool,
) -> ProxyStatus {
    wait_until(format!("{what} to run"), WAIT, Duration::from_millis(50), async || {
        let found = proxies(config).await.unwrap_or_default().into_iter().find(|p| matches(p));
        match found {
            Some(p) if p.status == "running" => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

fn agent_id(cp: &MockCp) -> String {
    let init = cp.on("/init").into_iter().next().expect("an /init");
    init.body["agent_id"].as_str().expect("agent_id").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_proxy_runs_after_registration_and_survives_agent_kill_9() {
    let cp = MockCp::start(Behaviour::default());
    let dirs = Dirs::new();
    let config = frpc_config(&dirs);
    let _reaper = FrpcReaper(config.clone());
    let env = env_with_standin(&dirs, cp.agent_env(&api_key(), 200));
    let port = free_port();
    let mut agent = Agent::start(&dirs, &["run"], &env, port);
    agent.wait_ready().await;
    cp.until("/init", WAIT, |r| count(r, "/init") >= 1).await;

    let name = agent_proxy_name(&agent_id(&cp));
    let proxy = running_proxy(&config, "the agent's proxy", |p| p.name == name).await;
    assert_eq!(
        (proxy.kind.as_str(), proxy.local_addr.clone()),
        ("http", format!("127.0.0.1:{port}"))
    );
    let main: ClientConfig = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let frp_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs.data.join("frp.json")).unwrap()).unwrap();
    assert_eq!(main.proxies[0].custom_domains, [frp_file["subdomain"].as_str().unwrap()]);
    assert_eq!(main.auth.token.expose(), frp_file["token"].as_str().unwrap(), "/init's token");
    let pid = pidfile(&dirs).expect("frpc pidfile");
    assert_eq!(frpc_processes(&config), [pid]);

    agent.kill9();
    assert_eq!(frpc_processes(&config), [pid], "frpc outlives the agent");
    let mut again = Agent::start(&dirs, &["run"], &env, port);
    again.wait_ready().await;
    // Samples after the second /init: the new agent has applied /init's credentials.
    cp.until("a second registration, then samples", WAIT, |r| {
        let last_init = r.iter().rposition(|x| x.path == "/init");
        let last_stats = r.iter().rposition(|x| x.path == "/stats" && x.answered == 200);
        count(r, "/init") >= 2 && last_stats > last_init
    })
    .await;
    assert_eq!(pidfile(&dirs), Some(pid), "the same frpc");
    assert_eq!(frpc_processes(&config), [pid], "no second frpc");
    let proxy =
        running_proxy(&config, "the agent's proxy after adoption", |p| p.name == name).await;
    assert_eq!(proxy.local_addr, format!("127.0.0.1:{port}"));
    let log = again.output();
    assert!(log.contains("adopted the running frpc"), "{log}");
    assert!(!log.contains("frpc started"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn new_credentials_from_init_restart_frpc_with_them() {
    let dirs = Dirs::new();
    let config = frpc_config(&dirs);
    let _reaper = FrpcReaper(config.clone());
    let port = free_port();
    let first_cp = MockCp::start(Behaviour::default());
    let env = env_with_standin(&dirs, first_cp.agent_env(&api_key(), 200));
    let mut agent = Agent::start(&dirs, &["run"], &env, port);
    agent.wait_ready().await;
    first_cp.until("/init", WAIT, |r| count(r, "/init") >= 1).await;
    let name = agent_proxy_name(&agent_id(&first_cp));
    running_proxy(&config, "the agent's proxy", |p| p.name == name).await;
    let old_pid = pidfile(&dirs).expect("frpc pidfile");
    agent.kill9();

    // Another control plane: another token and subdomain in /init.
    let cp = MockCp::start(Behaviour::default());
    let env = env_with_standin(&dirs, cp.agent_env(&api_key(), 200));
    let mut again = Agent::start(&dirs, &["run"], &env, port);
    again.wait_ready().await;
    cp.until("registration, then samples", WAIT, |r| !ok_stats(r).is_empty()).await;
    let frp_file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs.data.join("frp.json")).unwrap()).unwrap();
    let main: ClientConfig = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(main.auth.token.expose(), frp_file["token"].as_str().unwrap());
    let subdomain = frp_file["subdomain"].as_str().unwrap().to_owned();
    let proxy = running_proxy(&config, "the agent's proxy on the new subdomain", |p| {
        p.name == name && p.remote_addr == subdomain
    })
    .await;
    assert_eq!(proxy.local_addr, format!("127.0.0.1:{port}"));
    let new_pid = pidfile(&dirs).expect("frpc pidfile");
    assert_ne!(new_pid, old_pid, "a new main file means a restarted frpc");
    assert_eq!(frpc_processes(&config), [new_pid], "the old frpc is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn frpc_runs_from_the_environment_while_the_control_plane_is_down() {
    let cp = MockCp::start(Behaviour { down: true, ..Behaviour::default() });
    let dirs = Dirs::new();
    let config = frpc_config(&dirs);
    let _reaper = FrpcReaper(config.clone());
    remember_secret(TEST_TOKEN);
    let mut env = env_with_standin(&dirs, cp.agent_env(&api_key(), 200));
    env.extend([
        ("QUDATA_FRP_SERVER", "127.0.0.1".to_owned()),
        ("QUDATA_FRP_PORT", "7000".to_owned()),
        ("QUDATA_FRP_TOKEN", TEST_TOKEN.to_owned()),
        ("QUDATA_FRP_SUBDOMAIN", "host-env".to_owned()),
    ]);
    let port = free_port();
    let mut agent = Agent::start(&dirs, &["run"], &env, port);
    agent.wait_ready().await;
    let local = format!("127.0.0.1:{port}");
    let proxy = running_proxy(&config, "the agent's proxy", |p| p.local_addr == local).await;
    assert!(proxy.name.ends_with("-agent"), "{proxy:?}");
    assert_eq!(proxy.remote_addr, "host-env");
    assert_eq!(count(&cp.requests(), "/stats"), 0, "not registered yet");
    assert_eq!(frpc_processes(&config).len(), 1);
    agent.terminate();
    assert_eq!(frpc_processes(&config).len(), 1, "SIGTERM leaves frpc running too");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_credentials_one_line_says_so_and_no_frpc_starts() {
    let cp = MockCp::start(Behaviour { without_frp: true, ..Behaviour::default() });
    let dirs = Dirs::new();
    let config = frpc_config(&dirs);
    let _reaper = FrpcReaper(config.clone());
    let env = env_with_standin(&dirs, cp.agent_env(&api_key(), 200));
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    // Samples follow the tunnel step, so it has run by then.
    cp.until("registration, then samples", WAIT, |r| !ok_stats(r).is_empty()).await;
    let log = agent.output();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("no FRP credentials")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("server, port, token, subdomain missing"), "{}", lines[0]);
    assert!(!config.exists(), "no frpc config written");
    assert_eq!(pidfile(&dirs), None);
    assert!(frpc_processes(&config).is_empty());
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn local_mode_never_starts_frpc() {
    let dirs = Dirs::new();
    let config = frpc_config(&dirs);
    let _reaper = FrpcReaper(config.clone());
    remember_secret(TEST_TOKEN);
    let mut env = env_with_standin(&dirs, Vec::new());
    env.extend([
        ("QUDATA_FRP_SERVER", "127.0.0.1".to_owned()),
        ("QUDATA_FRP_PORT", "7000".to_owned()),
        ("QUDATA_FRP_TOKEN", TEST_TOKEN.to_owned()),
        ("QUDATA_FRP_SUBDOMAIN", "host-env".to_owned()),
    ]);
    let mut agent = Agent::start(&dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    assert_eq!(api.get("/instances").await.status, 200);
    // Production starts frpc right after serving; give a wrongly wired one time to show up.
    // A deliberate window in which nothing may happen, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!config.exists(), "no frpc config written");
    assert_eq!(pidfile(&dirs), None);
    assert!(frpc_processes(&config).is_empty());
    agent.terminate();
}
