//! The production guest image (`image-builder/build-guest.sh --no-nvidia`) through the agent,
//! under TCG: the real cloud-init applying the agent's seed on an image that keeps Debian's
//! stock `cloud.cfg` (a default user, `disable_root: true`), the real sshd, the real
//! JupyterLab.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::vm::{
    BOOT, host_port, openssh, openssh_as, production_guest_image, ssh_keygen, wait_gone,
    wait_status,
};
use crate::support::wait::wait_until;

/// The product README's example create request, sized for this machine: a container image
/// reference, JupyterLab as the command with its token in the environment, port 8888 as http.
fn seed_example() -> Value {
    json!({
        "image": "pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime",
        "ports": [
            {"container_port": 22, "remote_port": 10001, "proto": "tcp"},
            {"container_port": 8888, "remote_port": 20000, "proto": "http"}
        ],
        "env_variables": {"JUPYTER_TOKEN": "secret"},
        "command": "jupyter lab --ip=0.0.0.0 --allow-root",
        "ssh_enabled": true,
        "cpus": 2, "memory": "2G", "storage_gb": 12
    })
}

fn start_agent(dirs: &Dirs, port: u16) -> Agent {
    let env = [
        ("QUDATA_BASE_IMAGE", production_guest_image().display().to_string()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
        ("QUDATA_INSTANCE_CPUS", "2".to_owned()),
        ("QUDATA_INSTANCE_MEMORY", "2G".to_owned()),
    ];
    Agent::start(dirs, &["run", "--local"], &env, port)
}

/// `GET /api/status` of the guest's JupyterLab through its published port: the HTTP status,
/// and the body when it answered 200.
async fn jupyter_status(port: u16, token: Option<&str>) -> Option<(u16, Value)> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut request = client.get(format!("http://127.0.0.1:{port}/api/status"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("token {token}"));
    }
    let resp = request.send().await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    Some((status, body))
}

/// Waits until JupyterLab answers 200 with `token`: its `started` time (one per process).
async fn jupyter_started(port: u16, token: &str) -> String {
    let what = format!("JupyterLab on 127.0.0.1:{port} to answer with its token");
    wait_until(what, Duration::from_secs(300), Duration::from_secs(2), async || {
        match jupyter_status(port, Some(token)).await {
            Some((200, body)) => Ok(body["started"].as_str().unwrap_or_default().to_owned()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

fn known_hosts(dirs: &Dirs, id: &str) -> String {
    std::fs::read_to_string(dirs.data.join("vms").join(id).join("known_hosts")).unwrap()
}

async fn wait_login(key: &Path, user: &str, port: u16) -> String {
    let what = format!("{user}'s SSH login with the renter's key");
    wait_until(what, Duration::from_secs(120), Duration::from_secs(2), async || {
        openssh_as(key, user, port, "hostname")
    })
    .await
}

#[tokio::test]
async fn the_production_image_runs_the_seeds_example_request_and_a_jupyter_of_its_own() {
    let dirs = Dirs::new();
    let mut agent = start_agent(&dirs, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));

    let created = api.json("POST", "/instances", &seed_example()).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    let image = production_guest_image();
    let vm_image = image.file_stem().unwrap().to_str().unwrap();
    assert_eq!(created.body["data"]["vm_image"], vm_image, "the answer names the VM image");
    let running = wait_status(&api, "running", BOOT).await;
    assert_eq!(running["vm_image"], vm_image);
    assert!(running.get("jupyter_token").is_none(), "the renter's command runs, not ours");
    assert!(agent.output().contains("this host runs VMs, so the VM boots its default VM image"));

    // The renter's key logs in as root and as the image's default user.
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    let ssh = host_port(&dirs, &id, 22);
    assert_eq!(wait_login(&key, "root", ssh).await.trim(), format!("qudata-{id}"));
    assert_eq!(wait_login(&key, "renter", ssh).await.trim(), format!("qudata-{id}"));
    let renter_keys = openssh_as(&key, "renter", ssh, "cat ~/.ssh/authorized_keys").unwrap();
    assert_eq!(renter_keys.trim(), public, "the default user has the renter's keys only");
    openssh_as(&key, "renter", ssh, "sudo -n true").expect("passwordless sudo");
    // Stock cloud-init: the image keeps disable_root, the seed lifted it; done, no errors.
    let stock = openssh(&key, ssh, "grep -h '^disable_root' /etc/cloud/cloud.cfg").unwrap();
    assert_eq!(stock.trim(), "disable_root: true", "the image's cloud.cfg is Debian's");
    let status = openssh(&key, ssh, "cloud-init status --wait --format=json").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["status"], "done", "{status}");
    assert_eq!(status["errors"], json!([]), "{status}");
    assert_eq!(status["recoverable_errors"], json!({}), "{status}");
    let pwauth = openssh(&key, ssh, "sshd -T | grep -i '^passwordauthentication'").unwrap();
    assert_eq!(pwauth.trim(), "passwordauthentication no");

    // JupyterLab from the renter's command: the token works, nothing else does.
    let web = host_port(&dirs, &id, 8888);
    let started = jupyter_started(web, "secret").await;
    let refused = jupyter_status(web, None).await.map(|(code, _)| code);
    assert_eq!(refused, Some(403), "JupyterLab must refuse a request without its token");
    assert_eq!(jupyter_status(web, Some("wrong")).await.map(|(c, _)| c), Some(403));
    let cwd = openssh(&key, ssh, "readlink /proc/$(cat /run/qudata/renter.pid)/cwd").unwrap();
    assert_eq!(cwd.trim(), "/root", "Jupyter runs in the renter's home");

    // An agent killed -9 and started again adopts the VM; the renter's Jupyter is the same
    // process.
    agent.kill9();
    let mut agent = start_agent(&dirs, agent.port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    wait_status(&api, "running", Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // the adopted VM's configuration
    assert_eq!(jupyter_started(web, "secret").await, started, "Jupyter was restarted");

    // restart resets the guest; Jupyter comes back (a new process), keys still work.
    let restart = api.json("PUT", "/instances", &json!({"command": "restart"})).await;
    assert_eq!(restart.status, 200, "{:?}", restart.body);
    wait_status(&api, "running", BOOT).await;
    assert_ne!(jupyter_started(web, "secret").await, started, "a new boot, a new Jupyter");
    assert_eq!(wait_login(&key, "renter", ssh).await.trim(), format!("qudata-{id}"));
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
}

/// No command but port 8888: the agent starts JupyterLab with a token of its own, and the VM
/// has host keys of its own (the image has none: `guest_image` reads its root; the other test's
/// VM boots the same image at the same time).
#[tokio::test]
async fn the_agent_starts_jupyter_with_its_own_token_and_each_vm_has_its_own_host_keys() {
    let dirs = Dirs::new();
    let mut agent = start_agent(&dirs, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let body = json!({
        "ports": [{"container_port": 8888, "remote_port": 20001, "proto": "http"}],
        "ssh_enabled": true, "cpus": 2, "memory": "2G", "storage_gb": 12
    });
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    let running = wait_status(&api, "running", BOOT).await;
    let token = running["jupyter_token"].as_str().expect("a generated token").to_owned();
    assert!(token.len() >= 32, "{token}");
    let web = host_port(&dirs, &id, 8888);
    jupyter_started(web, &token).await;
    assert_eq!(jupyter_status(web, None).await.map(|(c, _)| c), Some(403));
    assert!(!agent.output().contains(&token), "the token reached the agent's log");

    // The keys the agent learned are this VM's: the guest's own files say the same, and they
    // were made at this boot (after the image was built).
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    let ssh = host_port(&dirs, &id, 22);
    wait_login(&key, "root", ssh).await;
    let learned = known_hosts(&dirs, &id);
    let own = openssh(&key, ssh, "cat /etc/ssh/ssh_host_ed25519_key.pub").unwrap();
    let own_key = own.split_whitespace().nth(1).expect("an ed25519 host key").to_owned();
    assert!(learned.contains(&own_key), "learned {learned:?}, the guest has {own:?}");
    let image_built = std::fs::metadata(production_guest_image()).unwrap().modified().unwrap();
    let made = openssh(&key, ssh, "stat -c %Y /etc/ssh/ssh_host_ed25519_key").unwrap();
    let made = std::time::UNIX_EPOCH + Duration::from_secs(made.trim().parse().unwrap());
    assert!(made > image_built, "the host key predates this VM");
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
}
