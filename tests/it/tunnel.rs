//! FRP tunnels against the frpc stand-in: reload without restart, back-off, adoption after an
//! agent restart, refused proxies, admin auth; a real frpc when QUDATA_FRPC_BINARY names one.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use qudata_agent::secret::Secret;
use qudata_agent::tunnel::config::{self, WebServerConfig, agent_proxy_name, proxy_name};
use qudata_agent::tunnel::{
    AdminClient, AdminError, Backoff, InstanceTunnels, MissingCredentials, TunnelError, TunnelPort,
    TunnelProto, Tunnels,
};

use crate::support::frpc::{FAST, Sandbox, TEST_TOKEN, creds, standin};
use crate::support::wait::wait_until;

const AGENT: &str = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c";
/// How long a test waits for frpc (the stand-in) to show a change, and how often it looks.
const SOON: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

fn instance(id: &str, ports: &[(u16, u16, u16, TunnelProto)]) -> InstanceTunnels {
    InstanceTunnels {
        instance_id: id.into(),
        subdomain: "lease-7".into(),
        ports: ports
            .iter()
            .map(|&(container_port, host_port, remote_port, proto)| TunnelPort {
                container_port,
                local: std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, host_port),
                remote_port,
                proto,
            })
            .collect(),
    }
}

/// Everything the agent logs in this test process (tests share one global subscriber).
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let writer = move || Sink(sink.clone());
        let _ = tracing_subscriber::fmt().with_ansi(false).with_writer(writer).try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn start(sb: &Sandbox, backoff: Backoff) -> Tunnels {
    captured_log();
    Tunnels::start(sb.settings(&standin(), backoff), Ok(creds(TEST_TOKEN))).await.expect("start")
}

#[tokio::test]
async fn publish_and_unpublish_reload_without_restart() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let pid = t.frpc_pid().await.expect("frpc runs");
    let admin = t.admin().await.unwrap();
    let agent = agent_proxy_name(AGENT);
    assert_eq!(admin.status().await.unwrap()[&agent].status, "running");

    // Watch the agent's own proxy the whole time: it must never leave /api/status.
    let stop = Arc::new(AtomicBool::new(false));
    let (gaps, polls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let watcher = tokio::spawn({
        let (admin, agent, stop, gaps, polls) =
            (admin.clone(), agent.clone(), stop.clone(), gaps.clone(), polls.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                let s = admin.status().await.expect("admin API answers throughout");
                if s.get(&agent).is_none_or(|p| p.status != "running") {
                    gaps.fetch_add(1, Ordering::SeqCst);
                }
                polls.fetch_add(1, Ordering::SeqCst);
                // Sampling the whole time, not waiting for anything: no wait_until here.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let inst = instance(
        "i-1",
        &[(22, 42022, 10001, TunnelProto::Tcp), (8888, 42888, 20000, TunnelProto::Http)],
    );
    let report = t.publish(&inst).await.unwrap();
    assert!(report.errors().is_empty(), "{report:?}");
    let status = admin.status().await.unwrap();
    let ssh = &status[&proxy_name(AGENT, "i-1", 22)];
    assert_eq!((ssh.kind.as_str(), ssh.status.as_str()), ("tcp", "running"));
    assert_eq!(ssh.local_addr, "127.0.0.1:42022");
    assert_eq!(status[&proxy_name(AGENT, "i-1", 8888)].remote_addr, "lease-7:20000");
    assert_eq!(t.frpc_pid().await, Some(pid), "publishing must not restart frpc");

    let include = sb.config.with_file_name("frpc.d").join("i-1.toml");
    for file in [&sb.config, &include] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    // frpc's output reaches the agent's log, at frp's level, under the `frpc` target.
    let log = captured_log();
    let seen = |needle: &str| {
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        text.lines().any(|l| l.contains(" INFO frpc:") && l.contains(needle))
    };
    let line = format!("[{}] start proxy", proxy_name(AGENT, "i-1", 22));
    wait_until("frpc output in the log", SOON, POLL, async || seen(&line)).await;

    // Same credentials again (a repeated /init): the main file is unchanged, frpc stays.
    t.set_credentials(creds(TEST_TOKEN)).await.unwrap();
    assert_eq!(t.frpc_pid().await, Some(pid), "an unchanged main file must not restart frpc");

    t.unpublish("i-1").await.unwrap();
    let status = admin.status().await.unwrap();
    assert!(!status.contains_key(&proxy_name(AGENT, "i-1", 22)));
    assert!(!sb.config.with_file_name("frpc.d").join("i-1.toml").exists());
    assert_eq!(t.frpc_pid().await, Some(pid), "unpublishing must not restart frpc");
    t.unpublish("i-1").await.expect("unpublish is idempotent");

    stop.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    assert!(polls.load(Ordering::SeqCst) > 0);
    assert_eq!(gaps.load(Ordering::SeqCst), 0, "the agent's proxy disappeared during a reload");
    assert_eq!(t.frpc_restarts().await, 0);
    t.teardown().await;
}

#[tokio::test]
async fn refused_proxy_is_reported_per_port_and_the_rest_stays_up() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    sb.control(serde_json::json!({"refuse_remote_ports": [10002]}));
    let inst = instance(
        "i-2",
        &[(22, 42022, 10001, TunnelProto::Tcp), (2222, 42222, 10002, TunnelProto::Tcp)],
    );
    let report = t.publish(&inst).await.unwrap();
    let errors = report.errors();
    assert_eq!(errors.keys().copied().collect::<Vec<_>>(), [2222]);
    assert!(errors[&2222].contains("port already used"), "{errors:?}");
    assert_eq!(t.proxy_errors("i-2").await, errors);
    let status = t.admin().await.unwrap().status().await.unwrap();
    assert_eq!(status[&proxy_name(AGENT, "i-2", 22)].status, "running");
    t.teardown().await;
}

#[tokio::test]
async fn a_crashing_frpc_is_restarted_with_backoff() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let first = t.frpc_pid().await.unwrap();
    sb.control(serde_json::json!({"crash": true}));
    wait_until("three restarts", SOON, POLL, async || {
        let restarts = t.frpc_restarts().await;
        if restarts >= 3 { Ok(()) } else { Err(format!("{restarts} restarts")) }
    })
    .await;
    sb.control(serde_json::json!({}));
    wait_until("a new frpc", SOON, POLL, async || match t.frpc_pid().await {
        Some(pid) if pid != first => Ok(()),
        pid => Err(format!("frpc pid {pid:?}")),
    })
    .await;
    // The restarted frpc serves the same config: publishing works again.
    let report =
        t.publish(&instance("i-3", &[(22, 42022, 10001, TunnelProto::Tcp)])).await.unwrap();
    assert!(report.errors().is_empty(), "{report:?}");
    t.teardown().await;
}

#[tokio::test]
async fn wrong_admin_password_is_a_clear_error() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let text = std::fs::read_to_string(&sb.config).unwrap();
    let main: qudata_agent::tunnel::config::ClientConfig = toml::from_str(&text).unwrap();
    let wrong = WebServerConfig { password: Secret::new("not-the-password"), ..main.web_server };
    let err = AdminClient::new(&wrong).reload().await.unwrap_err();
    assert!(matches!(err, AdminError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("refused the credentials"), "{err}");
    assert!(!err.to_string().contains("not-the-password"));
    t.teardown().await;
}

#[tokio::test]
async fn a_restarted_agent_adopts_the_same_frpc() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let pid = t.frpc_pid().await.unwrap();
    t.publish(&instance("i-4", &[(22, 42022, 10001, TunnelProto::Tcp)])).await.unwrap();
    drop(t); // the agent dies (kill -9, upgrade): frpc keeps running
    // An include changed while no agent ran: the adopting agent makes frpc reload it.
    let late = instance("i-9", &[(22, 42099, 10009, TunnelProto::Tcp)]);
    let text = config::render(&config::include_config(AGENT, &late)).unwrap();
    std::fs::write(config::include_path(&sb.config, "i-9"), text).unwrap();

    let t = start(&sb, FAST).await;
    assert_eq!(t.frpc_pid().await, Some(pid), "a second frpc was started");
    let admin = t.admin().await.unwrap();
    let i9 = proxy_name(AGENT, "i-9", 22);
    wait_until("i-9 running", SOON, POLL, async || match admin.status().await.unwrap().get(&i9) {
        Some(p) if p.status == "running" => Ok(()),
        p => Err(format!("{p:?}")),
    })
    .await;
    let status = admin.status().await.unwrap();
    assert_eq!(status[&proxy_name(AGENT, "i-4", 22)].status, "running");
    assert_eq!(t.published_ids(), ["i-4", "i-9"]);

    // A new token changes the main file: only then is frpc restarted.
    t.set_credentials(creds("frp-test-token-rotated-Kp2")).await.unwrap();
    let new_pid = t.frpc_pid().await.unwrap();
    assert_ne!(new_pid, pid);
    let status = t.admin().await.unwrap().status().await.unwrap();
    assert_eq!(status[&proxy_name(AGENT, "i-4", 22)].status, "running");
    t.teardown().await;
    assert!(!sb.run.join("frpc.pid").exists());
}

#[tokio::test]
async fn a_taken_admin_port_moves_to_a_new_one() {
    let sb = Sandbox::new();
    // Another program holds the admin port the main file on disk names.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    std::thread::spawn(move || squatter.incoming().for_each(drop));
    let web = WebServerConfig {
        addr: "127.0.0.1".into(),
        port: taken,
        user: "qudata".into(),
        password: Secret::new("pw-squatted"),
    };
    let main = config::main_config(&creds(TEST_TOKEN), &web, &sb.config, AGENT, 18123);
    std::fs::create_dir_all(sb.config.parent().unwrap()).unwrap();
    std::fs::write(&sb.config, config::render(&main).unwrap()).unwrap();

    let mut settings = sb.settings(&standin(), FAST);
    // Bounds the wait on the squatter too; long enough for the restarted stand-in to come up.
    settings.ready_timeout = Duration::from_secs(5);
    let t = Tunnels::start(settings, Ok(creds(TEST_TOKEN))).await.expect("start recovers");
    let now: config::ClientConfig =
        toml::from_str(&std::fs::read_to_string(&sb.config).unwrap()).unwrap();
    assert_ne!(now.web_server.port, taken);
    let status = t.admin().await.unwrap().status().await.unwrap();
    assert_eq!(status[&agent_proxy_name(AGENT)].status, "running");
    t.teardown().await;
}

#[tokio::test]
async fn a_strict_reload_refuses_unknown_keys() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let bad = sb.config.with_file_name("frpc.d").join("bad.toml");
    std::fs::write(
        &bad,
        "[[proxies]]\nname = \"x\"\ntype = \"tcp\"\nlocalPort = 1\nremotePort = 2\nbogus = 1\n",
    )
    .unwrap();
    let err =
        t.publish(&instance("i-5", &[(22, 42022, 10001, TunnelProto::Tcp)])).await.unwrap_err();
    assert!(matches!(err, TunnelError::Admin(AdminError::Refused { status: 400, .. })), "{err:?}");
    assert!(err.to_string().contains("bogus"), "{err}");
    t.teardown().await;
}

#[tokio::test]
async fn without_credentials_frpc_is_not_started() {
    let sb = Sandbox::new();
    let missing = MissingCredentials { missing: "token, subdomain".into() };
    let t = Tunnels::start(sb.settings(&standin(), FAST), Err(missing)).await.unwrap();
    assert_eq!(t.frpc_pid().await, None);
    assert!(!sb.run.join("frpc.pid").exists());
    let report =
        t.publish(&instance("i-6", &[(22, 42022, 10001, TunnelProto::Tcp)])).await.unwrap();
    assert!(report.errors()[&22].contains("no FRP credentials"), "{report:?}");
}

#[tokio::test]
async fn invalid_values_are_refused_before_any_file() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let mut bad = instance("i-7", &[(22, 42022, 10001, TunnelProto::Tcp)]);
    bad.subdomain = "not a label".into();
    assert!(matches!(t.publish(&bad).await, Err(TunnelError::Invalid { .. })));
    assert!(t.published_ids().is_empty());
    t.teardown().await;
}

#[tokio::test]
async fn real_frpc_when_available() {
    let Some(binary) = std::env::var_os("QUDATA_FRPC_BINARY") else {
        println!("skipped: set QUDATA_FRPC_BINARY to a real frpc (>= 0.52) to run this test");
        return;
    };
    let sb = Sandbox::new();
    // No FRP server here: frpc keeps retrying (loginFailExit = false) and serves its admin API.
    let mut c = creds(TEST_TOKEN);
    c.server_port = crate::support::agent::free_port();
    let settings = sb.settings(std::path::Path::new(&binary), FAST);
    let t = Tunnels::start(settings, Ok(c)).await.expect("real frpc accepts our main file");
    let report = t.publish(&instance("i-8", &[(22, 42022, 10001, TunnelProto::Tcp)])).await;
    let report = report.expect("real frpc accepts our include file under strictConfig");
    assert_eq!(report.ports.len(), 1);
    t.unpublish("i-8").await.unwrap();
    t.teardown().await;
}

/// `grep -a -o` over a binary file: every match, as text (grep is fast where a debug-built
/// scan of a 100 MB binary is not).
fn grep_binary(file: &std::path::Path, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("grep")
        .args(["-a", "-o"])
        .args(args)
        .arg(file)
        .output()
        .expect("grep runs");
    assert!(out.status.code().is_some_and(|c| c <= 1), "grep failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn no_frp_credential_is_compiled_into_the_agent() {
    let agent = std::path::Path::new(env!("CARGO_BIN_EXE_qudata-agent"));
    let secrets = [TEST_TOKEN, "frp-test-token-rotated-Kp2", "tok-golden", "pw-golden"];
    let mut args = vec!["-F"];
    for s in &secrets {
        args.extend(["-e", s]);
    }
    // Positive control: this test binary holds TEST_TOKEN, so the scan does find it there.
    let me = std::env::current_exe().unwrap();
    assert!(grep_binary(&me, &args).iter().any(|m| m == TEST_TOKEN));
    assert_eq!(grep_binary(agent, &args), Vec::<String>::new(), "test secrets in the agent");
    // A hard-coded token would sit next to its key: a TOML line or an env default.
    let hard_coded = ["-i", "-E", "-e", "token ?= ?\"[^\"]+\"", "-e", "FRP_TOKEN=[^ ]+"];
    let sample = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sample.path(), b"\0\x01[auth]\ntoken = \"abc\"\0").unwrap();
    assert_eq!(grep_binary(sample.path(), &hard_coded), ["token = \"abc\""], "the pattern works");
    assert_eq!(grep_binary(agent, &hard_coded), Vec::<String>::new(), "token in the agent");
}

#[tokio::test]
async fn a_missing_frpc_binary_is_a_clear_error() {
    let sb = Sandbox::new();
    let settings = sb.settings(std::path::Path::new("/nonexistent/frpc"), FAST);
    let err = Tunnels::start(settings, Ok(creds(TEST_TOKEN))).await.err().expect("refused");
    assert!(matches!(err, TunnelError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("QUDATA_FRPC_BINARY"), "{err}");
}

/// An instance never takes the agent's own domain on the FRP server (an http port on remote
/// port 80 or 443 without a subdomain of its own, or a token naming the agent's) nor the
/// server's ports: the create is refused with the field at fault, and no include file is
/// written even if it got as far as publishing.
#[tokio::test]
async fn a_create_asking_for_the_agents_domain_is_refused_and_nothing_is_written() {
    use qudata_agent::instance::Publisher;
    use qudata_agent::instance::model::{BackendKind, Instance, Proto, PublishedPort, Status};
    use qudata_agent::instance::spec::{HostLimits, parse_create};
    use qudata_agent::tunnel::TunnelPublisher;

    let sb = Sandbox::new();
    let tunnels = Arc::new(start(&sb, FAST).await);
    let publisher = TunnelPublisher::new(Arc::clone(&tunnels), &creds(TEST_TOKEN));
    let limits = HostLimits {
        cpus: 4,
        memory_mib: 4096,
        storage_gb: 50,
        default_cpus: 1,
        default_memory_mib: 1024,
        default_storage_gb: 5,
    };
    let instance = |token: Option<&str>, remote_port: u16, proto: Proto| {
        let body = serde_json::json!({"tunnel_token": token});
        Instance {
            id: "i-9".into(),
            backend: BackendKind::Qemu,
            spec: parse_create(&body, &limits).unwrap(),
            status: Status::Pending,
            error: None,
            created_at: chrono::Utc::now(),
            ports: vec![PublishedPort { guest_port: 8888, host_port: 42888, remote_port, proto }],
            gpus: Vec::new(),
            ssh_keys: Vec::new(),
            management_port: None,
            network: None,
            deleting: false,
            vm_image: None,
            jupyter_token: None,
        }
    };
    let refused = [
        (instance(None, 443, Proto::Http), "ports"),
        (instance(None, 80, Proto::Http), "ports"),
        (instance(Some("host-a1"), 443, Proto::Http), "ports"),
        (instance(None, 7000, Proto::Tcp), "ports"),
    ];
    for (hijack, field) in refused {
        let err = publisher.validate(&hijack).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(publisher.publish(&hijack).await.is_err());
    }
    assert!(tunnels.published_ids().is_empty());
    let include = config::include_dir(&sb.config);
    let written = std::fs::read_dir(&include).map(|d| d.count()).unwrap_or(0);
    assert_eq!(written, 0, "an include file was written in {}", include.display());
    // With a subdomain of its own, remote port 443 is the renter's.
    publisher.validate(&instance(Some("lease-7"), 443, Proto::Http)).unwrap();
    drop(publisher);
    let tunnels = Arc::try_unwrap(tunnels).ok().expect("the only handle");
    tunnels.teardown().await;
}

/// An frpc of ours that cannot be adopted (its pidfile lost) is stopped before a new one
/// starts: left running, it would hold the admin port beside the new one forever.
#[tokio::test]
async fn a_stale_frpc_that_cannot_be_adopted_is_stopped_before_a_new_one_starts() {
    let sb = Sandbox::new();
    let t = start(&sb, FAST).await;
    let old = t.frpc_pid().await.unwrap();
    drop(t); // the agent dies; frpc keeps running
    std::fs::remove_file(sb.run.join("frpc.pid")).unwrap();

    let t = start(&sb, FAST).await;
    let new = t.frpc_pid().await.unwrap();
    assert_ne!(new, old);
    // Gone, or a zombie of this test process (its parent) that nobody reaped.
    let stat = std::fs::read_to_string(format!("/proc/{old}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    assert!(matches!(state, None | Some(Some('Z'))), "the stale frpc still runs: {stat}");
    // The new one serves: a publish reaches it.
    t.publish(&instance("i-5", &[(22, 42055, 10005, TunnelProto::Tcp)])).await.unwrap();
    let admin = t.admin().await.unwrap();
    assert_eq!(admin.status().await.unwrap()[&proxy_name(AGENT, "i-5", 22)].status, "running");
    t.teardown().await;
}
