//! Upgrading a host from the Go agent (v0.0.9a, github.com/qubu-group/qudata-agent): files laid
//! out as its scripts/install.py and internal/storage/store.go leave them. The real install.sh
//! against a temporary root stops and disables it and keeps it for a rollback; the real agent
//! then registers with the Go agent's agent id and secret, and neither prints the secret.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::agent::{Agent, Dirs, free_port};
use crate::support::install::Fixture;
use crate::support::mock_cp::{Behaviour, MockCp, api_key, count, remember_secret};

const GO_ID: &str = "0b7e4f2a-9c1d-4e8b-a6f3-5d2c1b0a9e8f";
const GO_SECRET: &str = "sk-go-v009a-3c5e7a9b1d2f4e6a8c0b";
const GO_API_KEY: &str = "ak-go-v009a-unit-key-5b7d9f1e";
const GO_BINARY: &[u8] = b"\x7fELF the Go agent v0.0.9a";

/// The unit scripts/install.py `create_service` writes (0644, the API key in it).
fn go_unit() -> String {
    format!(
        "[Unit]\nDescription=QuData Agent\nAfter=network.target\n\n[Service]\nType=simple\n\
         ExecStart=/usr/local/bin/qudata-agent\nRestart=always\nRestartSec=10\n\
         Environment=\"QUDATA_API_KEY={GO_API_KEY}\"\n\
         Environment=\"QUDATA_GPU_PCI_ADDRS=0000:01:00.0\"\n\
         Environment=\"QUDATA_BASE_IMAGE=/var/lib/qudata/images/qudata-base.qcow2\"\n\
         Environment=\"QUDATA_MANAGEMENT_KEY=/var/lib/qudata/.ssh/management_key\"\n\n\
         [Install]\nWantedBy=multi-user.target\n"
    )
}

/// The frpc config internal/frpc/config.go renders to /etc/qudata/frpc.toml (0644).
const GO_FRPC: &str = "serverAddr = \"frp.example.test\"\nserverPort = 7000\n\n[auth]\n\
    method = \"token\"\ntoken = \"go-frp-token-0123\"\n\n[transport]\ntcpMuxKeepaliveInterval = 30\n\
    dialServerKeepalive = 30\n\n[log]\nto = \"console\"\nlevel = \"debug\"\n\n[[proxies]]\n\
    name = \"agent-0b7e4f2a-9c1d-4e8b-a6f3-5d2c1b0a9e8f\"\ntype = \"http\"\n\
    customDomains = [\"tunnel-0b7e-12001\"]\nlocalIP = \"127.0.0.1\"\nlocalPort = 12001\n";

fn write(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, PermissionsExt::from_mode(mode)).unwrap();
}

/// The Go agent's state dir: store.go writes agent_id, agent_secret and api_key without a
/// newline, 0600, in /var/lib/qudata (MkdirAll 0755).
fn go_state(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::set_permissions(data, PermissionsExt::from_mode(0o755)).unwrap();
    write(&data.join("agent_id"), GO_ID.as_bytes(), 0o600);
    write(&data.join("agent_secret"), GO_SECRET.as_bytes(), 0o600);
    write(&data.join("api_key"), GO_API_KEY.as_bytes(), 0o600);
}

/// A host as the Go agent v0.0.9a's installer leaves it (enabled unit, binary, state, frpc
/// config, base image and management key).
fn go_host(fx: &Fixture) {
    write(&fx.at("/etc/systemd/system/qudata-agent.service"), go_unit().as_bytes(), 0o644);
    let wants = fx.at("/etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/qudata-agent.service",
        wants.join("qudata-agent.service"),
    )
    .unwrap();
    write(&fx.at("/usr/local/bin/qudata-agent"), GO_BINARY, 0o755);
    go_state(&fx.at("/var/lib/qudata"));
    write(&fx.at("/var/lib/qudata/images/qudata-base.qcow2"), b"QFI\xfb go base", 0o644);
    write(&fx.at("/var/lib/qudata/.ssh/management_key"), b"go management key", 0o600);
    write(&fx.at("/etc/qudata/frpc.toml"), GO_FRPC.as_bytes(), 0o644);
}

fn assert_no_secret(text: &str) {
    for secret in [GO_SECRET, GO_API_KEY, "go-frp-token-0123"] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
}

#[test]
fn install_stops_and_keeps_the_go_agent_and_a_second_run_changes_nothing() {
    let fx = Fixture::new(false);
    go_host(&fx);
    let wants = fx.at("/etc/systemd/system/multi-user.target.wants/qudata-agent.service");

    let before = fx.tree();
    let dry = fx.install(&["--dry-run"], &[]);
    assert!(dry.ok, "{}", dry.text);
    assert_eq!(fx.tree(), before, "--dry-run changed files:\n{}", dry.text);
    assert_no_secret(&dry.text);
    for line in [
        format!(
            "Go agent found: {}, agent id {GO_ID}",
            fx.at("/etc/systemd/system/qudata-agent.service").display()
        ),
        "would stop and disable the Go agent (qudata-agent.service)".to_owned(),
    ] {
        assert!(dry.text.contains(&line), "{line:?} missing:\n{}", dry.text);
    }

    let run = fx.install(&[], &[]);
    assert!(run.ok, "{}", run.text);
    assert_no_secret(&run.text);
    assert!(run.text.contains("stopped and disabled the Go agent"), "{}", run.text);
    // Disabled under --root: the wants link is gone (the new unit is enabled by systemctl,
    // which --root skips), and the new unit replaced the Go one.
    assert!(std::fs::symlink_metadata(&wants).is_err(), "{}", run.text);
    assert_eq!(
        std::fs::read(fx.at("/etc/systemd/system/qudata-agent.service")).unwrap(),
        std::fs::read(
            Path::new(crate::support::install::REPO).join("systemd/qudata-agent.service")
        )
        .unwrap()
    );
    // Kept for a rollback, private (the unit holds the API key).
    let keep = "/var/lib/qudata/go-agent";
    assert_eq!(fx.mode(keep), 0o700);
    assert_eq!(
        std::fs::read_to_string(fx.at(&format!("{keep}/qudata-agent.service"))).unwrap(),
        go_unit()
    );
    assert_eq!(fx.mode(&format!("{keep}/qudata-agent.service")), 0o600);
    assert_eq!(std::fs::read(fx.at(&format!("{keep}/qudata-agent"))).unwrap(), GO_BINARY);
    assert_eq!(fx.mode(&format!("{keep}/qudata-agent")), 0o700);
    let record = std::fs::read_to_string(fx.at(&format!("{keep}/upgrade.txt"))).unwrap();
    assert!(
        record.contains("stopped and disabled: qudata-agent.service") && record.contains(GO_ID),
        "{record}"
    );
    assert_no_secret(&record);
    assert_eq!(fx.mode(&format!("{keep}/upgrade.txt")), 0o600);
    // The Go agent's state is left as it was; the agent takes it over at its first start.
    let data = fx.at("/var/lib/qudata");
    assert_eq!(std::fs::read_to_string(data.join("agent_id")).unwrap(), GO_ID);
    assert_eq!(std::fs::read_to_string(data.join("agent_secret")).unwrap(), GO_SECRET);
    assert_eq!(std::fs::read_to_string(fx.at("/etc/qudata/frpc.toml")).unwrap(), GO_FRPC);
    assert!(!data.join("identity.json").exists() && !data.join("agent-secret").exists());

    let before = fx.tree();
    let again = fx.install(&[], &[]);
    assert!(again.ok, "{}", again.text);
    assert_eq!(fx.tree(), before, "a second run changed files:\n{}", again.text);
    assert!(again.text.contains("up to date: Go agent upgrade"), "{}", again.text);
    assert!(!again.text.contains("Go agent found"), "{}", again.text);
}

#[test]
fn without_the_go_agent_install_says_nothing_of_it() {
    let fx = Fixture::new(false);
    let run = fx.install(&[], &[]);
    assert!(run.ok, "{}", run.text);
    assert!(!run.text.contains("Go agent"), "{}", run.text);
    assert!(!fx.at("/var/lib/qudata/go-agent").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_registers_with_the_go_agents_id_and_secret() {
    remember_secret(GO_SECRET);
    // A control plane that keeps the host's secret (sends none): the agent must use the Go one.
    let cp = MockCp::start(Behaviour { empty_secret: true, ..Behaviour::default() });
    let key = api_key();
    let dirs = Dirs::new();
    go_state(&dirs.data);
    write(&dirs.root.path().join("etc/frpc.toml"), GO_FRPC.as_bytes(), 0o644);
    let mut agent = Agent::start(&dirs, &["run"], &cp.agent_env(&key, 200), free_port());
    agent.wait_ready().await;
    let reqs =
        cp.until("/init/host", Duration::from_secs(60), |r| count(r, "/init/host") >= 1).await;

    let init = reqs.iter().find(|r| r.path == "/init").unwrap();
    assert_eq!(init.body["agent_id"], GO_ID, "{:?}", init.body);
    let host = reqs.iter().find(|r| r.path == "/init/host").unwrap();
    assert_eq!(host.header("x-agent-secret"), Some(GO_SECRET));
    agent.terminate();

    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs.data.join("identity.json")).unwrap()).unwrap();
    assert_eq!(identity["agent_id"], GO_ID);
    assert_eq!(std::fs::read_to_string(dirs.data.join("agent-secret")).unwrap(), GO_SECRET);
    for name in ["identity.json", "agent-secret", "frp.json", "go-agent-import.json"] {
        let mode = std::fs::metadata(dirs.data.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let output = agent.output();
    assert!(output.contains("took over the Go agent's identity"), "{output}");
    assert_no_secret(&output);

    // A restart keeps the same id and imports nothing again.
    let seen = cp.requests().len();
    let mut again = Agent::start(&dirs, &["run"], &cp.agent_env(&key, 200), free_port());
    again.wait_ready().await;
    let reqs = cp
        .until("the restarted agent's /init", Duration::from_secs(60), |r| {
            r[seen..].iter().any(|r| r.path == "/init")
        })
        .await;
    let second = reqs[seen..].iter().find(|r| r.path == "/init").unwrap();
    assert_eq!(second.body["agent_id"], GO_ID);
    again.terminate();
    assert!(!again.output().contains("took over"), "{}", again.output());
    assert_no_secret(&again.output());
}
