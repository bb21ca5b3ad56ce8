//! QEMU VM instances end to end: the real binary in local mode, real QEMU under TCG booting the
//! CI guest, real SSH (the agent's russh and OpenSSH as a second opinion).

use std::time::Duration;

use serde_json::json;

use crate::support::agent::{Agent, Api, Dirs, local_secret};
use crate::support::vm::{
    BOOT, fresh_agent, guest_logins, host_port, http_get, leftovers, openssh, qemu_pids, record,
    ssh_keygen, start_agent, wait_for_qemu, wait_gone, wait_http, wait_status,
};

/// The renter's service: busybox httpd serving a page made from an environment value. The
/// value is hostile on purpose: it must arrive as data, never run.
fn create_body() -> serde_json::Value {
    json!({
        "ssh_enabled": true,
        "cpus": 1,
        "memory": "512M",
        "storage_gb": 2,
        "ports": [{"container_port": 8080, "remote_port": 20000, "proto": "http"}],
        "command": "mkdir -p /srv && printf '%s\\n' \"$GREETING\" > /srv/index.html && exec httpd -f -p 8080 -h /srv",
        "env_variables": {"GREETING": "hello $(touch /tmp/pwned) `id` ';"}
    })
}

const GREETING: &str = "hello $(touch /tmp/pwned) `id` ';\n";

/// QEMU runs as its unprivileged user (never root, no capabilities) under its seccomp filter.
fn assert_confined(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default();
        line.split_whitespace().map(str::to_owned).collect::<Vec<_>>()
    };
    let user = std::process::Command::new("id").args(["-u", "qudata-qemu"]).output().unwrap();
    let uid = String::from_utf8_lossy(&user.stdout).trim().to_owned();
    assert!(!uid.is_empty() && uid != "0", "qudata-qemu: {user:?}");
    assert_eq!(field("Uid:"), [uid.as_str(); 4], "real, effective, saved, fs uid:\n{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(field("Seccomp:"), ["2"], "seccomp filter mode:\n{status}");
}

/// QEMU's monitor is a socket the agent bound in a directory only root may change, and QEMU
/// got as a descriptor: nothing in the run dir QEMU owns is connected to.
fn assert_monitor_is_the_agents(dirs: &Dirs, id: &str, pid: u32) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let chardev = args.windows(2).find(|w| w[0] == "-chardev" && w[1].starts_with("socket,id=qmp"));
    let chardev = chardev.map(|w| w[1].clone()).unwrap_or_default();
    assert!(
        chardev.starts_with("socket,id=qmp,fd=") && chardev.ends_with(",server=on,wait=off"),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a == "-qmp"), "{args:?}");
    let dir = dirs.run.join("qmp");
    let meta = std::fs::symlink_metadata(&dir).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o700));
    let socket = std::fs::symlink_metadata(dir.join(format!("{id}.sock"))).unwrap();
    assert!(socket.file_type().is_socket());
    assert!(!dirs.run.join("vms").join(id).join("qmp.sock").exists());
}

async fn started() -> (Dirs, Agent, Api) {
    let dirs = Dirs::new();
    let mut agent = fresh_agent(&dirs);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    (dirs, agent, api)
}

async fn create_running(dirs: &Dirs, api: &Api) -> String {
    // A VM image this host does not have is refused; a container image boots the default.
    let mut unknown = create_body();
    unknown["image"] = json!("no-such-image");
    let refused = api.json("POST", "/instances", &unknown).await;
    assert_eq!(refused.status, 400, "{:?}", refused.body);
    let error = refused.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("is not a VM image known to this host"), "{error}");
    let mut body = create_body();
    body["image"] = json!("pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime");
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let data = &created.body["data"];
    assert_eq!(data["status"], "pending");
    assert_eq!(data["vm_image"], "ci-guest", "the VM image that runs instead: {data}");
    let id = data["id"].as_str().unwrap().to_owned();
    // Local mode has no tunnel: the answer shows the 127.0.0.1 ports that reach the guest.
    assert_eq!(data["ports"]["8080"], host_port(dirs, &id, 8080).to_string());
    assert_eq!(data["ports"]["22"], host_port(dirs, &id, 22).to_string(), "ssh_enabled: {data}");
    assert_eq!(
        record(dirs, &id)["ports"][0]["remote_port"],
        20000,
        "the request's remote port is kept"
    );
    wait_status(api, "running", BOOT).await;
    assert_eq!(qemu_pids(&id).len(), 1, "one QEMU for the instance");
    assert_confined(qemu_pids(&id)[0]);
    assert_monitor_is_the_agents(dirs, &id, qemu_pids(&id)[0]);
    // On the test's bridge, at an address the agent allocated and recorded; the agent
    // reaches it there (no management forward of its own).
    let rec = record(dirs, &id);
    assert!(rec["management_port"].is_null(), "{rec}");
    let tap = rec["network"]["tap"].as_str().expect("a tap in the record");
    assert_eq!(dirs.net.taps(), [tap.to_owned()], "one tap, the VM's");
    id
}

#[tokio::test]
async fn lifecycle_ports_keys_and_cleanup() {
    let (dirs, _agent, api) = started().await;
    let id = create_running(&dirs, &api).await;
    // Readiness and configuration share one SSH session (it was two logins).
    assert_eq!(guest_logins(&dirs, &id), 1, "one SSH session per guest");

    // QEMU outlives the agent with the environment it was given: none of the agent's settings
    // (in production the API key among them), only what every child may see.
    let pid = qemu_pids(&id)[0];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| kv.split(|b| *b == b'=').next())
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect();
    assert!(
        names.iter().all(|n| ["PATH", "LANG", "LC_ALL", "TZ"].contains(&n.as_str())),
        "{names:?}"
    );

    // The renter's command runs as a service and its published port answers on 127.0.0.1.
    let web = host_port(&dirs, &id, 8080);
    assert_eq!(wait_http(web, Duration::from_secs(60)).await, GREETING);

    // A renter key added through the API lets the real OpenSSH client in; removing it locks
    // it out again; the hostile env value never ran.
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    let ssh = host_port(&dirs, &id, 22);
    assert!(openssh(&key, ssh, "true").is_err(), "no renter key yet");
    let added = api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    let again = api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await;
    assert_eq!(again.status, 200, "a duplicate add is accepted once");
    let hostname = openssh(&key, ssh, "hostname").expect("renter key works");
    assert_eq!(hostname.trim(), format!("qudata-{id}"));
    let listed = openssh(&key, ssh, "cat /root/.ssh/authorized_keys").unwrap();
    assert_eq!(listed.matches(public.split_whitespace().nth(1).unwrap()).count(), 1);
    assert_eq!(
        openssh(&key, ssh, "test -e /tmp/pwned && echo ran || echo safe").unwrap(),
        "safe\n"
    );
    let removed = api.json("DELETE", "/ssh", &json!({"ssh_pubkey": public})).await;
    assert_eq!(removed.status, 200);
    assert!(openssh(&key, ssh, "true").is_err(), "removed key still works");

    // stop pauses the vCPUs: the port forward accepts but nothing answers.
    let put = |cmd: &str| json!({"command": cmd});
    assert_eq!(api.json("PUT", "/instances", &put("stop")).await.status, 200);
    wait_status(&api, "paused", Duration::from_secs(10)).await;
    assert_eq!(http_get(web).await, None, "a paused guest must not serve");
    let busy = api.json("PUT", "/instances", &put("restart")).await;
    assert_eq!(busy.status, 200, "restart of a paused VM is allowed: {:?}", busy.body);
    wait_status(&api, "running", BOOT).await;
    // The service comes back after the reset (configure runs after every boot).
    assert_eq!(wait_http(web, Duration::from_secs(60)).await, GREETING);
    assert_eq!(api.json("PUT", "/instances", &put("stop")).await.status, 200);
    assert_eq!(api.json("PUT", "/instances", &put("start")).await.status, 200);
    wait_status(&api, "running", Duration::from_secs(10)).await;
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, GREETING);

    // QEMU killed behind the agent's back → error with a reason, then DELETE cleans up.
    let pids = qemu_pids(&id);
    assert_eq!(pids.len(), 1);
    // SAFETY: kill(2) on the test's own VM process.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let failed = wait_status(&api, "error", Duration::from_secs(30)).await;
    let reason = failed["error"].as_str().unwrap_or_default();
    assert!(reason.contains("QEMU exited"), "reason: {reason}");
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
    wait_status(&api, "destroyed", Duration::from_secs(5)).await;
}

#[tokio::test]
async fn agent_kill9_adopts_the_running_vm_untouched() {
    let (dirs, mut agent, api) = started().await;
    let id = create_running(&dirs, &api).await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    let pid = qemu_pids(&id);
    let web = host_port(&dirs, &id, 8080);
    let uptime = openssh(&key, host_port(&dirs, &id, 22), "cat /proc/uptime").unwrap();

    let dnsmasq = dirs.net.dnsmasq().expect("the bridge's dnsmasq");
    let taps = dirs.net.taps();
    agent.kill9();
    assert_eq!(qemu_pids(&id), pid, "QEMU survives the agent");
    let mut agent = start_agent(&dirs, agent.port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let data = wait_status(&api, "running", Duration::from_secs(60)).await;
    assert_eq!(data["id"], id.as_str());
    assert_eq!(qemu_pids(&id), pid, "nothing was recreated");
    // Its network was never cut: the same tap, DHCP/DNS server and rules.
    assert_eq!(dirs.net.taps(), taps);
    assert_eq!(dirs.net.dnsmasq(), Some(dnsmasq), "dnsmasq kept, not restarted");
    assert!(dirs.net.table_exists());
    // Same guest (not rebooted), same ports, same keys, and QMP works again.
    let later = openssh(&key, host_port(&dirs, &id, 22), "cat /proc/uptime").unwrap();
    let secs = |s: &str| s.split_whitespace().next().unwrap().parse::<f64>().unwrap();
    assert!(secs(&later) > secs(&uptime), "the guest was rebooted: {uptime} then {later}");
    assert_eq!(wait_http(web, Duration::from_secs(30)).await, GREETING);
    let put = json!({"command": "stop"});
    assert_eq!(api.json("PUT", "/instances", &put).await.status, 200, "QMP after adoption");
    wait_status(&api, "paused", Duration::from_secs(10)).await;
    let put = json!({"command": "start"});
    assert_eq!(api.json("PUT", "/instances", &put).await.status, 200);
    wait_status(&api, "running", Duration::from_secs(10)).await;

    // A guest that powers itself off is noticed through the adopted QMP connection.
    let _ = openssh(&key, host_port(&dirs, &id, 22), "poweroff");
    let off = wait_status(&api, "error", Duration::from_secs(60)).await;
    let reason = off["error"].as_str().unwrap_or_default();
    assert!(reason.contains("powered itself off"), "reason: {reason}");
    assert!(qemu_pids(&id).is_empty(), "QEMU exits with its guest");

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn races_during_create_leave_nothing_behind() {
    let (dirs, _agent, api) = started().await;
    // Two creates at once: exactly one is admitted.
    let body = create_body();
    let (a, b) =
        tokio::join!(api.json("POST", "/instances", &body), api.json("POST", "/instances", &body));
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{:?} {:?}", a.body, b.body);
    let won = if a.status == 200 { &a } else { &b };
    let id = won.body["data"]["id"].as_str().unwrap().to_owned();

    // Commands that do not fit `pending` are refused with the state in the message.
    let start = api.json("PUT", "/instances", &json!({"command": "start"})).await;
    assert_eq!(start.status, 409);
    assert!(start.body["error"].as_str().unwrap().contains("pending"), "{:?}", start.body);

    // Delete while the guest is still booting: everything goes, nothing is left.
    // A booting guest ignores the ACPI powerdown: the full grace, then quit (35 s and more).
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
    wait_status(&api, "destroyed", Duration::from_secs(5)).await;
    assert!(leftovers(&dirs, &id).is_empty());

    // The host is usable again: a fresh create is admitted and cleaned up too.
    let again = api.json("POST", "/instances", &create_body()).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    let id2 = again.body["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id2, Duration::from_secs(120)).await;
}

/// Host maintenance on a VM the renter paused: `recover --stop-all` resumes it so the guest
/// powers down cleanly (its disk matters: the record is kept), and `start` boots it again.
#[tokio::test]
async fn stop_all_powers_a_paused_vm_down_cleanly_and_start_boots_it_again() {
    let (dirs, mut agent, api) = started().await;
    let id = create_running(&dirs, &api).await;
    let web = host_port(&dirs, &id, 8080);
    assert_eq!(api.json("PUT", "/instances", &json!({"command": "stop"})).await.status, 200);
    wait_status(&api, "paused", Duration::from_secs(10)).await;
    assert!(agent.terminate().success());
    assert_eq!(qemu_pids(&id).len(), 1, "SIGTERM leaves the VM");

    // A dry run lists the VM's network as kept, and changes nothing.
    let tap = record(&dirs, &id)["network"]["tap"].as_str().unwrap().to_owned();
    let out = crate::support::agent::recover_command(&dirs)
        .args(["--dry-run", "--json"])
        .output()
        .unwrap();
    let dry = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: serde_json::Value = serde_json::from_str(&dry).unwrap_or_default();
    let network: Vec<&serde_json::Value> = rows["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["subject"] == "network")
        .collect();
    assert!(
        network.iter().any(|r| r["name"].as_str().unwrap().starts_with(&format!("tap {tap} "))
            && r["action"] == "kept"),
        "{dry}"
    );
    assert_eq!(dirs.net.taps(), std::slice::from_ref(&tap));

    let mut recover = crate::support::agent::recover_command(&dirs);
    // QUDATA_DEBUG: the log says how each VM was stopped.
    recover.envs(crate::support::vm::vm_env()).env("QUDATA_DEBUG", "true");
    let out = recover.args(["--stop-all", "--json"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}\n{stderr}");
    assert!(!report.contains("\"failed\""), "{report}");
    assert!(stderr.contains("PoweredDown"), "not a clean power-down:\n{stderr}");
    assert!(qemu_pids(&id).is_empty(), "QEMU still runs");
    assert_eq!(record(&dirs, &id)["status"], "error");
    // Its tap went with QEMU; its address and rules stay with the record it may boot from.
    assert!(dirs.net.taps().is_empty(), "{:?}", dirs.net.taps());
    assert!(dirs.net.table_exists());
    assert!(dirs.data.join("vms").join(&id).join("disk.qcow2").exists(), "the disk is kept");

    let mut agent = start_agent(&dirs, agent.port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let data = wait_status(&api, "error", Duration::from_secs(10)).await;
    assert!(data["error"].as_str().unwrap().contains("host maintenance"), "{data}");
    assert_eq!(api.json("PUT", "/instances", &json!({"command": "start"})).await.status, 200);
    wait_status(&api, "running", BOOT).await;
    assert_eq!(wait_http(web, Duration::from_secs(60)).await, GREETING, "booted from its disk");
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
}

/// A lease that ended does not outlive the agent: a `DELETE` accepted just before a `SIGTERM`
/// is finished before the agent exits, without a restart. The guest is still booting, so it
/// would ignore the ACPI power button for the whole grace: QEMU is stopped at once instead.
#[tokio::test]
async fn a_delete_accepted_before_sigterm_is_finished_before_the_agent_exits() {
    let (dirs, mut agent, api) = started().await;
    let created = api.json("POST", "/instances", &create_body()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_for_qemu(&id, Duration::from_secs(60)).await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    let status = agent.terminate();
    assert!(status.success(), "{status:?}\n{}", agent.output());
    assert_eq!(leftovers(&dirs, &id), Vec::<String>::new(), "{}", agent.output());
    assert!(agent.output().contains("finishing the deletions in progress"), "{}", agent.output());
}

/// A host installed before QEMU ran as a user of its own keeps its base image private (0600
/// under 0700 directories, as the old installer left it): the agent lets QEMU's user read it
/// (directories traverse-only, the image world-readable) and the VM boots.
#[tokio::test]
async fn a_base_image_left_private_by_an_older_install_still_boots() {
    use std::os::unix::fs::PermissionsExt;

    use crate::support::agent::free_port;
    use crate::support::vm::{ci_guest_image, create_running, small_vm};

    let dirs = Dirs::new();
    let images = dirs.data.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let base = images.join("base.qcow2");
    std::fs::copy(ci_guest_image(), &base).unwrap();
    let private = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    private(&base, 0o600);
    private(&images, 0o700);
    private(&dirs.data, 0o700);
    let env = [
        ("QUDATA_BASE_IMAGE", base.display().to_string()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
    ];
    let mut agent = Agent::start(&dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let id = create_running(&api, &small_vm()).await;
    assert_confined(qemu_pids(&id)[0]);
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&dirs.data), mode(&images), mode(&base)), (0o711, 0o711, 0o644));
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
}

/// The renter re-keys the guest's SSH server on a running VM. Printed on the VM's console (as
/// the agent's images do by themselves), the new keys are learned there and the agent's access
/// goes on; not printed, the agent stays out and the VM keeps running.
#[tokio::test]
async fn a_guest_re_keyed_by_its_renter_keeps_running_and_its_console_says_the_new_keys() {
    let (dirs, agent, api) = started().await;
    let id = create_running(&dirs, &api).await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    let ssh = host_port(&dirs, &id, 22);
    wait_renter_login(&key, ssh).await;
    let known_hosts = dirs.data.join("vms").join(&id).join("known_hosts");
    let learned = std::fs::read_to_string(&known_hosts).unwrap();
    assert_eq!(learned.lines().count(), 2, "both keys the console showed: {learned}");

    // New keys; every dropbear (the agent's connection too) ends and init starts a new one.
    let re_key = |print: bool| {
        let print = if print {
            "{ echo -----BEGIN SSH HOST KEY KEYS-----; \
               dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key | grep ^ssh-; \
               echo -----END SSH HOST KEY KEYS-----; } > /dev/console; "
        } else {
            ""
        };
        format!(
            "rm -f /etc/dropbear/dropbear_*_host_key && \
             dropbearkey -t ed25519 -f /etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1 && \
             {print}(sleep 1; killall dropbear) >/dev/null 2>&1 &"
        )
    };
    let _ = openssh(&key, ssh, &re_key(true));
    tokio::time::sleep(Duration::from_secs(3)).await; // the agent's connection is gone
    let (_, second) = ssh_keygen(keys.path(), "second");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": second})).await.status, 200);
    let applied = || openssh(&key, ssh, "cat /root/.ssh/authorized_keys").unwrap_or_default();
    let body = second.split_whitespace().nth(1).unwrap().to_owned();
    crate::support::wait::wait_until(
        "the agent to apply a key after the re-key",
        Duration::from_secs(90),
        Duration::from_secs(1),
        || {
            let body = body.clone();
            async move { applied().contains(&body).then_some(()) }
        },
    )
    .await;
    assert_ne!(std::fs::read_to_string(&known_hosts).unwrap(), learned, "learned again");
    assert!(agent.output().contains("learned the new ones from its console"));

    // Not printed: the agent cannot tell it is this VM. It stays out; the VM runs on.
    let _ = openssh(&key, ssh, &re_key(false));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, third) = ssh_keygen(keys.path(), "third");
    let refused = api.json("POST", "/ssh", &json!({"ssh_pubkey": third})).await;
    assert_eq!(refused.status, 409, "{:?}", refused.body);
    let message = refused.body.to_string();
    assert!(message.contains("nor one its console showed"), "{message}");
    let third_body = third.split_whitespace().nth(1).unwrap();
    assert!(!applied().contains(third_body), "the agent logged in to an unverified guest");
    let status = api.call("GET", "/instances", None).await;
    assert_eq!(status.body["data"]["status"], "running", "{:?}", status.body);
    assert!(status.body["data"].get("error").is_none(), "{:?}", status.body);
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(30)).await;
}

async fn wait_renter_login(key: &std::path::Path, port: u16) {
    let key = key.to_owned();
    crate::support::wait::wait_until(
        "the renter's key to work",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let key = key.clone();
            async move { openssh(&key, port, "true").ok() }
        },
    )
    .await;
}
