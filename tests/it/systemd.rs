//! The systemd unit (`systemd/qudata-agent.service`) and the agent's side of `Type=notify`.
//!
//! `systemd-analyze verify` runs offline (no systemd as PID 1 here) and checks the unit the way
//! systemd would load it. It also insists that `ExecStart=`'s program exists, and the unit
//! names the installed path (/usr/local/bin), which a test machine does not have: the test
//! verifies a copy whose `ExecStart=` points at the binary cargo built, nothing else changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;

use crate::support::agent::{Agent, Dirs, free_port};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/qudata-agent.service");
const INSTALLED_BINARY: &str = "/usr/local/bin/qudata-agent";

/// `[section] key` → every value it is given, in order (systemd keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = String::new();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
        out.entry(format!("[{section}] {}", key.trim())).or_default().push(value.trim().into());
    }
    out
}

fn unit_text() -> String {
    std::fs::read_to_string(UNIT).unwrap()
}

/// A copy of the unit in `dir`, `ExecStart=` on the built binary, then `edit`ed.
fn unit_copy(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = unit_text();
    assert!(text.contains(&format!("ExecStart={INSTALLED_BINARY} ")), "ExecStart moved?");
    let text = text.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_qudata-agent"));
    let path = dir.join("qudata-agent.service");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

/// Runs `systemd-analyze verify`; returns (success, the lines that are about `unit`).
fn verify(unit: &Path) -> (bool, Vec<String>) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("systemd-analyze (package systemd) runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let name = unit.file_name().unwrap().to_string_lossy().into_owned();
    let ours = stderr.lines().filter(|l| l.contains(&name)).map(str::to_owned).collect();
    (out.status.success(), ours)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, complaints) = verify(&unit_copy(dir.path(), |t| t));
    assert!(ok && complaints.is_empty(), "systemd-analyze verify: {complaints:#?}");
}

#[test]
fn verify_catches_what_it_is_meant_to_catch() {
    // Negative controls: unknown keys only warn (exit 0), so the test above also demands
    // silence; a missing program is an error.
    let dir = tempfile::tempdir().unwrap();
    let typo = unit_copy(dir.path(), |t| t.replace("KillMode=process", "KilMode=process"));
    let (_, complaints) = verify(&typo);
    assert!(complaints.iter().any(|l| l.contains("KilMode")), "{complaints:#?}");
    let missing = unit_copy(dir.path(), |t| {
        t.replace(env!("CARGO_BIN_EXE_qudata-agent"), "/nonexistent/qudata-agent")
    });
    assert!(!verify(&missing).0, "a missing ExecStart program must fail verify");
}

fn one<'a>(unit: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match unit.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{key}: expected exactly one value, got {other:?}"),
    }
}

#[test]
fn the_unit_keeps_vms_running_and_secrets_out() {
    let text = unit_text();
    let unit = parse_unit(&text);
    let s = |k: &str| format!("[Service] {k}");
    assert_eq!(one(&unit, &s("Type")), "notify");
    assert_eq!(one(&unit, &s("NotifyAccess")), "main");
    assert_eq!(one(&unit, &s("ExecStart")), format!("{INSTALLED_BINARY} run"));
    // VMs outlive the agent: only the main process is signalled, and the run dir holding
    // their QMP sockets and pidfiles survives a stop.
    assert_eq!(one(&unit, &s("KillMode")), "process");
    assert_eq!(one(&unit, &s("RuntimeDirectoryPreserve")), "yes");
    assert_eq!(one(&unit, &s("Restart")), "always");
    assert!(!one(&unit, &s("RestartSec")).starts_with('0'), "a back-off between restarts");
    assert_eq!(one(&unit, &s("LimitMEMLOCK")), "infinity");
    // Settings come only from the 0600 file; no value is set in the unit itself.
    assert_eq!(one(&unit, &s("EnvironmentFile")), "/etc/qudata/agent.env");
    assert!(!unit.contains_key(&s("Environment")), "no Environment= in the unit");
    assert!(!text.contains("ak-") && !text.contains("QUDATA_API_KEY="), "no key in the unit");

    // The directories systemd makes are the agent's defaults.
    let default = |name: &str| {
        qudata_agent::config::SETTINGS.iter().find(|x| x.name == name).unwrap().default.unwrap()
    };
    let state = one(&unit, &s("StateDirectory"));
    assert_eq!(format!("/var/lib/{state}"), default("QUDATA_DATA_DIR"));
    let runtime = one(&unit, &s("RuntimeDirectory"));
    assert_eq!(format!("/run/{runtime}"), default("QUDATA_RUN_DIR"));
    let frpc_dir = Path::new(default("QUDATA_FRPC_CONFIG")).parent().unwrap();
    assert_eq!(one(&unit, &s("ProtectSystem")), "strict");
    assert_eq!(Path::new(one(&unit, &s("ReadWritePaths"))), frpc_dir, "frpc's config is writable");

    // Options that would break VFIO, /sys writes or TCG must stay out.
    for breaks in [
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
        "ProtectKernelTunables",
        "MemoryDenyWriteExecute",
        "User",
        "DynamicUser",
    ] {
        assert!(!unit.contains_key(&s(breaks)), "{breaks}= breaks GPU passthrough or QEMU");
    }
}

/// Waits (deadline 90 s) for the next datagram on `sock`.
async fn next_message(sock: &UnixDatagram, agent: &Agent) -> String {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(90), sock.recv(&mut buf)).await {
        Ok(n) => String::from_utf8(buf[..n.unwrap()].to_vec()).unwrap(),
        Err(_) => panic!("no notification within 90 s:\n{}", agent.output()),
    }
}

/// Starts the agent with `NOTIFY_SOCKET`; READY=1 must come only once the API answers, and
/// STOPPING=1 once SIGTERM arrives.
async fn ready_then_stopping(args: &[&str], env: &[(&str, String)]) {
    let dirs = Dirs::new();
    let socket = dirs.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).unwrap();
    let mut env = env.to_vec();
    env.push(("NOTIFY_SOCKET", socket.to_string_lossy().into_owned()));
    let port = free_port();
    let started = Instant::now();
    let mut agent = Agent::start(&dirs, args, &env, port);

    let ready = next_message(&sock, &agent).await;
    let ready_after = started.elapsed();
    // Asked once, at the moment READY arrives: no retry, so an early READY fails here.
    let ping = reqwest::Client::new()
        .get(agent.url("/ping"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap_or_else(|e| panic!("READY=1 before the API answers: {e}\n{}", agent.output()));
    assert_eq!(ping.status(), 200);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains(&format!("STATUS=API listening on 127.0.0.1:{port}")), "{ready:?}");
    eprintln!("{args:?}: READY=1 {} ms after start", ready_after.as_millis());

    // SIGTERM: STOPPING=1, then a clean exit.
    let status = tokio::task::spawn_blocking(move || {
        let status = agent.terminate();
        (status, agent)
    });
    let (status, agent) = status.await.unwrap();
    let stopping = next_message(&sock, &agent).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(status.success(), "{status}:\n{}", agent.output());
}

#[tokio::test]
async fn local_mode_notifies_ready_once_serving_and_stopping_on_sigterm() {
    ready_then_stopping(&["run", "--local"], &[]).await;
}

#[tokio::test]
async fn production_mode_notifies_ready_while_the_control_plane_is_down() {
    // Nothing listens on the control plane's port: the API must serve (and READY be sent)
    // without waiting for registration.
    let service = format!("http://127.0.0.1:{}/v0", free_port());
    let env = [("QUDATA_API_KEY", "ak-notify-test".to_owned()), ("QUDATA_SERVICE_URL", service)];
    ready_then_stopping(&["run"], &env).await;
}

/// The unit's sandbox does not break QEMU: a VM boots under TCG and answers SSH with the
/// agent inside it (see tests/support/sandbox.rs for what is reproduced and what is not).
#[tokio::test]
async fn a_vm_boots_and_answers_ssh_inside_the_units_sandbox() {
    use crate::support::agent::{Api, local_secret};
    use crate::support::sandbox::{mount_options, unit_sandbox};
    use crate::support::vm::{
        create_running, host_port, openssh, small_vm, ssh_keygen, vm_env, wait_gone,
    };

    // Outside /tmp, which the sandbox replaces; the one writable directory inside it.
    let root = tempfile::Builder::new()
        .prefix("qudata-sandbox-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let run = root.path().join("run");
    let net = crate::support::net::TestNet::new(&run);
    let host_ports = crate::support::agent::next_host_port_slice();
    let dirs = Dirs { net, data: root.path().join("data"), run, root, host_ports };
    // The image is read-only inside the sandbox, like /var/lib/qudata/images.
    let env = vm_env();
    let wrapper = unit_sandbox(dirs.root.path());
    let mut agent = Agent::start_via(&wrapper, &dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;

    // The sandbox is in force for the agent (unshare, sh, prlimit and setpriv all exec).
    let pid = agent.pid();
    let root_mount = mount_options(pid, "/").expect("the agent's / in its mountinfo");
    assert!(root_mount.starts_with("ro,"), "/ is not read-only for the agent: {root_mount}");
    let tmp = mount_options(pid, "/tmp").expect("a /tmp mount");
    assert!(tmp.ends_with(" tmpfs"), "/tmp is not private: {tmp}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "no_new_privs is not set");

    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let id = create_running(&api, &small_vm()).await;
    let (key, public) = ssh_keygen(dirs.root.path(), "renter");
    let added = api.json("POST", "/ssh", &serde_json::json!({"ssh_pubkey": public})).await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    let ssh = host_port(&dirs, &id, 22);
    let hostname = openssh(&key, ssh, "hostname").expect("the guest answers SSH");
    assert!(!hostname.trim().is_empty());

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(60)).await;
}
