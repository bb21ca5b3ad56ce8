//! SSH into a container: the real OpenSSH client against the SSH server of a Debian image
//! (made with debootstrap on the host), renter keys through the agent's API.

use std::time::Duration;

use serde_json::json;

use crate::support::docker::Engine;
use crate::support::docker_agent::{START, container, started, wait_container_gone};
use crate::support::docker_images::debian_sshd;
use crate::support::vm::{host_port, openssh, ssh_keygen, wait_status};

#[tokio::test]
async fn renter_keys_reach_the_containers_sshd_and_survive_a_restart() {
    let engine = Engine::shared();
    let image = debian_sshd(engine);
    let (dirs, _agent, api) = started(engine).await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    let body = json!({"image": image, "ssh_enabled": true, "command": "exec sleep infinity"});
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    // A key added while pending is applied once the container is ready.
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    wait_status(&api, "running", START).await;

    let ssh = host_port(&dirs, &id, 22);
    let hostname = openssh(&key, ssh, "hostname").expect("renter key works");
    assert_eq!(hostname.trim(), container(&id));
    let mode = openssh(&key, ssh, "stat -c %a /root/.ssh /root/.ssh/authorized_keys").unwrap();
    assert_eq!(mode, "700\n600\n");

    // Removed → locked out; added again → in.
    assert_eq!(api.json("DELETE", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    assert!(openssh(&key, ssh, "true").is_err(), "removed key still works");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    assert!(openssh(&key, ssh, "true").is_ok());

    // A container restart ends the SSH server; the agent starts it again with the keys.
    let put = json!({"command": "restart"});
    assert_eq!(api.json("PUT", "/instances", &put).await.status, 200);
    wait_status(&api, "running", START).await;
    let again = openssh(&key, ssh, "cat /root/.ssh/authorized_keys").expect("in after restart");
    assert_eq!(again.matches(public.split_whitespace().nth(1).unwrap()).count(), 1);

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_status(&api, "destroyed", Duration::from_secs(60)).await;
    wait_container_gone(engine, &id, Duration::from_secs(30));
}
