//! VM tests: the CI guest image, the agent's view of an instance, and what a VM leaves behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::agent::{Agent, Api, Dirs, free_port};
use super::wait::wait_until;

/// Boot to SSH under TCG on 2 busy cores: generous, since a slow CI machine is not a failure.
pub const BOOT: Duration = Duration::from_secs(420);

/// The CI guest, built once per test run by `image-builder/build-ci-guest.sh` (which caches
/// its downloads and skips a build whose inputs did not change).
pub fn ci_guest_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ci-guest");
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("image-builder/build-ci-guest.sh");
            let result =
                Command::new("bash").arg(&script).arg(&out).output().expect("run the builder");
            assert!(
                result.status.success(),
                "building the CI guest failed:\n{}\n{}",
                String::from_utf8_lossy(&result.stdout),
                String::from_utf8_lossy(&result.stderr)
            );
            let image = out.join("ci-guest.qcow2");
            assert!(image.is_file(), "the builder wrote no {}", image.display());
            image
        })
        .clone()
}

/// The production guest without the NVIDIA driver (`build-guest.sh --no-nvidia`), built once
/// per test run into the directory the CI guest goes to (the builder caches its packages and
/// skips a build whose inputs did not change; a cold build takes minutes).
pub fn production_guest_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build_production_guest("guest.qcow2", &["--no-nvidia"])).clone()
}

/// The production guest with the NVIDIA driver (DKMS builds the module: long on 2 cores).
pub fn production_guest_image_nvidia() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build_production_guest("guest-nvidia.qcow2", &[])).clone()
}

fn build_production_guest(name: &str, flags: &[&str]) -> PathBuf {
    let image = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ci-guest").join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("image-builder/build-guest.sh");
    let result = Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(&image)
        .args(flags)
        .output()
        .expect("run the builder");
    assert!(
        result.status.success(),
        "building the production guest failed:\n{}\n{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    let last =
        String::from_utf8_lossy(&result.stdout).lines().last().unwrap_or_default().to_owned();
    assert_eq!(Path::new(&last), image, "the builder's last line names the image");
    assert!(image.is_file(), "the builder wrote no {}", image.display());
    image
}

/// The settings that make the agent run VMs of the CI guest under TCG (no working KVM here).
pub fn vm_env() -> Vec<(&'static str, String)> {
    vec![
        ("QUDATA_BASE_IMAGE", ci_guest_image().display().to_string()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
    ]
}

/// The VM every test boots: under TCG a guest of the host's default size (every core, most of
/// the memory) spends its boot initialising it and stalls on a busy machine.
pub fn small_vm() -> Value {
    serde_json::json!({"ssh_enabled": true, "cpus": 1, "memory": "512M", "storage_gb": 2})
}

/// `POST /instances` with `body`, which must be accepted: the new instance's id.
pub async fn create(api: &Api, body: &Value) -> String {
    let created = api.json("POST", "/instances", body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    created.body["data"]["id"].as_str().expect("the new instance's id").to_owned()
}

/// [`create`], then waits until the instance runs.
pub async fn create_running(api: &Api, body: &Value) -> String {
    let id = create(api, body).await;
    wait_status(api, "running", BOOT).await;
    id
}

/// Local mode with the CI guest as base image, under TCG.
pub fn start_agent(dirs: &Dirs, port: u16) -> Agent {
    Agent::start(dirs, &["run", "--local"], &vm_env(), port)
}

pub fn fresh_agent(dirs: &Dirs) -> Agent {
    start_agent(dirs, free_port())
}

/// Polls `GET /instances` until `status` is `want`; panics on `error` (unless wanted) or at
/// the deadline.
pub async fn wait_status(api: &Api, want: &str, limit: Duration) -> Value {
    poll_status(api, want, limit, true).await
}

/// [`wait_status`] for an instance in `error` now that is expected to come back to `want` on
/// its own (the agent notices at its next poll): `error` on the way is no failure.
pub async fn wait_status_after_error(api: &Api, want: &str, limit: Duration) -> Value {
    poll_status(api, want, limit, false).await
}

async fn poll_status(api: &Api, want: &str, limit: Duration, error_fails: bool) -> Value {
    let what = format!("the instance to be {want}");
    wait_until(what, limit, Duration::from_millis(250), async || {
        let answer = api.get("/instances").await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let data = answer.body["data"].clone();
        let status = data["status"].as_str().unwrap_or_default().to_owned();
        let failed = error_fails && status == "error" && want != "error";
        assert!(!failed, "instance failed: {data}");
        if status == want { Ok(data) } else { Err(format!("{status}: {data}")) }
    })
    .await
}

/// The instance record as stored by the agent.
pub fn record(dirs: &Dirs, id: &str) -> Value {
    let text = std::fs::read_to_string(dirs.data.join("instances").join(format!("{id}.json")))
        .expect("instance record");
    serde_json::from_str(&text).unwrap()
}

/// The 127.0.0.1 port forwarding to `guest_port`, from the record.
pub fn host_port(dirs: &Dirs, id: &str, guest_port: u16) -> u16 {
    let rec = record(dirs, id);
    let ports = rec["ports"].as_array().expect("ports");
    let port = ports.iter().find(|p| p["guest_port"] == guest_port).expect("published port");
    port["host_port"].as_u64().unwrap() as u16
}

/// SSH logins the guest's dropbear has logged on the serial console since this boot began
/// (every client: the agent's and the test's own).
pub fn guest_logins(dirs: &Dirs, id: &str) -> usize {
    let serial = dirs.data.join("vms").join(id).join("serial.log");
    let log = std::fs::read(serial).unwrap_or_default();
    String::from_utf8_lossy(&log).matches("auth succeeded for").count()
}

/// Pids of processes whose command line carries `-name qudata-<id>`.
pub fn qemu_pids(id: &str) -> Vec<u32> {
    let marker = format!("qudata-{id}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie =
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && args.windows(2).any(|w| w[0] == b"-name" && w[1] == marker.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Everything an instance may leave behind, empty when it is gone without a trace.
pub fn leftovers(dirs: &Dirs, id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for pid in qemu_pids(id) {
        found.push(format!("QEMU process {pid}"));
    }
    for path in [
        dirs.data.join("vms").join(id),
        dirs.run.join("vms").join(id),
        dirs.data.join("instances").join(format!("{id}.json")),
    ] {
        if path.exists() {
            found.push(path.display().to_string());
        }
    }
    // The test's bridge holds this instance only: with it gone, none of the network stays.
    let net = &dirs.net;
    found.extend(net.taps().into_iter().map(|t| format!("tap {t}")));
    if net.bridge_exists() {
        found.push(format!("bridge {}", net.bridge));
    }
    if net.table_exists() {
        found.push(format!("nftables table {}", net.table()));
    }
    if let Some(pid) = net.dnsmasq() {
        found.push(format!("dnsmasq {pid}"));
    }
    found
}

/// Waits until `leftovers` is empty.
pub async fn wait_gone(dirs: &Dirs, id: &str, limit: Duration) {
    let what = format!("instance {id} to leave nothing behind");
    wait_until(what, limit, Duration::from_millis(250), async || {
        let left = leftovers(dirs, id);
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    })
    .await
}

/// A fresh ed25519 key pair made by the real `ssh-keygen`: (private key path, public line).
pub fn ssh_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_owned();
    (key, public)
}

/// Runs `command` in the guest with the real OpenSSH client; `Ok(stdout)` or `Err(stderr)`.
pub fn openssh(key: &Path, port: u16, command: &str) -> Result<String, String> {
    openssh_to(key, "127.0.0.1", port, command)
}

/// [`openssh`] to `host` (a guest's own address on the agent's bridge).
pub fn openssh_to(key: &Path, host: &str, port: u16, command: &str) -> Result<String, String> {
    openssh_login(key, "root", host, port, command)
}

/// [`openssh`] as `user` (the image's default user).
pub fn openssh_as(key: &Path, user: &str, port: u16, command: &str) -> Result<String, String> {
    openssh_login(key, user, "127.0.0.1", port, command)
}

fn openssh_login(
    key: &Path,
    user: &str,
    host: &str,
    port: u16,
    command: &str,
) -> Result<String, String> {
    let known = key.with_extension("known_hosts");
    let out = Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=20"])
        .args(["-o", "StrictHostKeyChecking=no"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), &format!("{user}@{host}"), command])
        .output()
        .expect("ssh");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `GET http://127.0.0.1:<port>/` with a short timeout: `Some(body)` when it answers.
pub async fn http_get(port: u16) -> Option<String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let resp = client.get(format!("http://127.0.0.1:{port}/")).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

/// Polls [`http_get`] until it answers.
pub async fn wait_http(port: u16, limit: Duration) -> String {
    let what = format!("an HTTP answer on 127.0.0.1:{port}");
    wait_until(what, limit, Duration::from_millis(500), async || http_get(port).await).await
}

/// Waits until the instance's QEMU runs: its pid.
pub async fn wait_for_qemu(id: &str, limit: Duration) -> u32 {
    let what = format!("a QEMU for instance {id}");
    wait_until(what, limit, Duration::from_millis(100), async || qemu_pids(id).first().copied())
        .await
}
