//! Containers get the VMs' promise: on the agent's Docker network a container reaches "the
//! internet" (a namespace the traffic is routed to) and not the host on any address, a private
//! range, the metadata address or another container; its ports are published on 127.0.0.1.

use std::net::TcpListener;
use std::time::Duration;

use serde_json::json;

use crate::support::agent::{Dirs, free_port, local_secret};
use crate::support::docker::Engine;
use crate::support::docker_agent::{START, container, start_agent_with};
use crate::support::docker_images::busybox;
use crate::support::net::Internet;
use crate::support::vm::{wait_gone, wait_status};

/// `GET <host>:<port>/` from inside `name` with busybox `nc`: whether the marker came back.
fn container_gets(engine: &Engine, name: &str, host: &str, port: u16) -> bool {
    let line = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 4 {host} {port}");
    let out = engine.cli(&["exec", name, "sh", "-c", &line]);
    String::from_utf8_lossy(&out.stdout).contains("qudata-net-test")
}

/// The same from the host (the listener is really there).
fn host_gets(host: &str, port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = format!("{host}:{port}").parse().unwrap();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(4)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(4)));
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.contains("qudata-net-test")
}

#[tokio::test]
async fn a_container_reaches_the_internet_and_nothing_else() {
    let engine = Engine::shared();
    let image = busybox(engine);
    let dirs = Dirs::new();
    let web = dirs.root.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("index.html"), "qudata-net-test\n").unwrap();
    // The containers' bridge is the one routed to "the internet" here.
    let internet = Internet::for_bridge(&format!("{}c", dirs.net.bridge), dirs.net.n, &web);
    let listener = TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let open_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut [0u8; 1024]);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nqudata-net-test\n");
        }
    });

    let mut agent = start_agent_with(&dirs, engine, free_port(), &[]);
    agent.wait_ready().await;
    let api = crate::support::agent::Api::new(&agent, Some(&local_secret(&dirs)));
    let body = json!({"image": image, "cpus": 1, "memory": "256M", "storage_gb": 5,
                      "command": "exec sleep 3600"});
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_status(&api, "running", START).await;
    let name = container(&id);

    // On the agent's network, at an address of its subnet.
    let network = format!("qudata-{}c", dirs.net.bridge);
    let networks = engine.inspect(&name, "{{json .NetworkSettings.Networks}}").unwrap();
    assert!(networks.contains(&network), "{networks}");
    let gateway = dirs.net.container_subnet.replace(".0/24", ".1");

    assert!(container_gets(engine, &name, &internet.address, 80), "the internet");
    let refusals = [
        ("the host on the network's gateway", gateway.clone()),
        ("the host's end of its uplink", internet.host_address.clone()),
    ];
    for (what, host) in &refusals {
        assert!(host_gets(host, open_port), "{what}: no listener: the check proves nothing");
        assert!(!container_gets(engine, &name, host, open_port), "the container reached {what}");
    }
    let metadata = internet_has_metadata(&internet);
    assert!(metadata, "no listener on the metadata address in the namespace");
    assert!(!container_gets(engine, &name, "169.254.169.254", 80), "the metadata address");

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(60)).await;
    agent.kill9();
    drop(internet);
    let _ = engine.cli(&["network", "rm", &network]);
}

/// The namespace answers on 169.254.169.254 (so the container's failure is the rules').
fn internet_has_metadata(internet: &Internet) -> bool {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &internet.ns, "busybox", "nc", "-w", "4", "169.254.169.254", "80"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).contains("qudata-net-test")
}
