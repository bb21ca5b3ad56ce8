//! The guest's network with real parts: a VM (CI guest, TCG) on the agent's bridge reaches
//! "the internet" (a network namespace its traffic is routed to) by name and by address, and
//! nothing else: every refusal is checked from inside the guest against a listener that is
//! really there (the host, or the namespace, reaches it), so it fails by the rules.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::net::Internet;
use crate::support::vm::{BOOT, openssh, record, ssh_keygen, vm_env, wait_gone, wait_status};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A neighbour on the bridge where another VM would be: a namespace with an address of the
/// subnet and a web server, its veth a port of the bridge.
struct Neighbour {
    ns: String,
    address: String,
}

impl Neighbour {
    fn new(dirs: &Dirs, web: &std::path::Path) -> Neighbour {
        let tag = format!("{}n{}", std::process::id() % 1000, dirs.net.n % 1000);
        let (ns, port, peer) = (format!("qnb{tag}"), format!("qnp{tag}"), format!("qnq{tag}"));
        let address = dirs.net.subnet.replace(".0/24", ".250");
        run("ip", &["netns", "add", &ns]);
        run("ip", &["link", "add", &port, "type", "veth", "peer", "name", &peer]);
        run("ip", &["link", "set", &peer, "netns", &ns]);
        run("ip", &["link", "set", &port, "master", &dirs.net.bridge, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns.as_str()];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        in_ns(&["ip", "addr", "add", &format!("{address}/24"), "dev", &peer]);
        in_ns(&["ip", "link", "set", &peer, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&[
            "busybox",
            "httpd",
            "-p",
            &format!("{address}:80"),
            "-h",
            &web.display().to_string(),
        ]);
        Neighbour { ns, address }
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A private address of the host's own, on an interface of the test's.
struct HostAddress {
    link: String,
    address: String,
}

impl HostAddress {
    fn new(dirs: &Dirs) -> HostAddress {
        let link = format!("qhd{}n{}", std::process::id() % 1000, dirs.net.n % 1000);
        let address = format!("10.99.{}.1", dirs.net.n % 256);
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        // (No dummy driver in every kernel: an empty bridge holds an address as well.)
        run("ip", &["link", "add", &link, "type", "bridge"]);
        run("ip", &["addr", "add", &format!("{address}/32"), "dev", &link]);
        run("ip", &["link", "set", &link, "up"]);
        HostAddress { link, address }
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.link]).output();
    }
}

/// `GET <url>` from inside the guest, by busybox `nc` (the static busybox's wget crashes on
/// any URL): `Ok(answer)` or `Err(what it said)`. `url` is `http://<address>[:<port>]/<path>`.
fn guest_get(key: &std::path::Path, ssh: u16, url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (host, port) = authority.split_once(':').unwrap_or((authority, "80"));
    let command = format!(
        "printf 'GET /{path} HTTP/1.0\\r\\n\\r\\n' | nc -w 4 {host} {port} 2>&1 || echo FAILED"
    );
    openssh(key, ssh, &command)
        .map_err(|e| format!("ssh: {e}"))
        .and_then(|out| if out.contains("qudata-net-test") { Ok(out) } else { Err(out) })
}

/// `GET <url>` from the host, or inside namespace `ns`, by busybox `nc`: the listener is
/// there. (busybox's wget crashes on this machine, static or not.)
fn reachable(ns: Option<&str>, url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (host, port) = authority.split_once(':').unwrap_or((authority, "80"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.unwrap_or("--")]);
    let mut cmd = match ns {
        Some(_) => cmd,
        None => Command::new("busybox"),
    };
    if ns.is_some() {
        cmd.arg("busybox");
    }
    let mut child = cmd
        .args(["nc", "-w", "4", host, port])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let request = format!("GET /{path} HTTP/1.0\r\n\r\n");
    child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("qudata-net-test")
}

#[tokio::test]
async fn a_guest_reaches_the_internet_and_nothing_else() {
    let dirs = Dirs::new();
    let web = dirs.root.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("index.html"), "qudata-net-test\n").unwrap();
    let internet = Internet::new(&dirs.net, &web);
    let private = HostAddress::new(&dirs);
    // Anything listening on every address of the host (what a careless service does).
    let listener = TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let open_port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            // The request first: closing with it unread would reset the connection.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut [0u8; 1024]);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nqudata-net-test\n");
        }
    });
    drop(server);

    let mut env = vm_env();
    env.push(("QUDATA_VM_DNS", internet.address.clone()));
    env.push(("QUDATA_VM_BANDWIDTH_MBIT", "400".into()));
    env.push(("QUDATA_VM_CONNTRACK_LIMIT", "512".into()));
    env.push(("QUDATA_VM_BLOCKED", "192.88.99.0/24".into()));
    let mut agent = Agent::start(&dirs, &["run", "--local"], &env, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let body = json!({"ssh_enabled": true, "cpus": 1, "memory": "512M", "storage_gb": 2});
    let created = api.json("POST", "/instances", &body).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    wait_status(&api, "running", BOOT).await;
    let neighbour = Neighbour::new(&dirs, &web);

    let keys = tempfile::tempdir().unwrap();
    let (key, public) = ssh_keygen(keys.path(), "renter");
    assert_eq!(api.json("POST", "/ssh", &json!({"ssh_pubkey": public})).await.status, 200);
    let ssh: u16 = created.body["data"]["ports"]["22"].as_str().unwrap().parse().unwrap();
    let rec = record(&dirs, &id);
    let address = rec["network"]["address"].as_str().unwrap().to_owned();

    // The guest got the address the agent recorded, by DHCP, and the agent's resolver.
    let ip = openssh(&key, ssh, "ip -4 addr show eth0").unwrap();
    assert!(ip.contains(&format!("inet {address}/24")), "{ip}");
    let resolv = openssh(&key, ssh, "cat /etc/resolv.conf").unwrap();
    assert!(resolv.contains(&format!("nameserver {}", dirs.net.gateway())), "{resolv}");

    // Names resolve through the agent's dnsmasq (which asks the namespace's server). (busybox
    // nslookup has a resolver of its own; the static wget cannot use glibc's.)
    // (It asks for AAAA too, which the namespace's server refuses: its status is not the point.)
    let answer = openssh(&key, ssh, "nslookup internet.test 2>&1; true").unwrap();
    assert!(answer.contains(crate::support::net::PUBLIC_NAME_ADDRESS), "{answer}");
    // The internet is reached, masqueraded behind the host's address.
    let by_address = format!("http://{}/", internet.address);
    let page = guest_get(&key, ssh, &by_address).expect("the internet");
    assert!(page.contains("qudata-net-test"), "{page}");

    // Nothing else, each with a listener that is really there.
    let gateway = dirs.net.gateway();
    let refusals = [
        ("the host on the bridge's address", None, format!("http://{gateway}:{open_port}/")),
        ("the host on a private address", None, format!("http://{}:{open_port}/", private.address)),
        (
            "the host's end of its uplink",
            None,
            format!("http://{}:{open_port}/", internet.host_address),
        ),
        ("the metadata address", Some(internet.ns.as_str()), "http://169.254.169.254/".to_owned()),
        (
            "a neighbour on the bridge",
            Some(neighbour.ns.as_str()),
            format!("http://{}/", neighbour.address),
        ),
    ];
    for (what, there, url) in &refusals {
        assert!(reachable(*there, url), "{what}: no listener at {url}: the check proves nothing");
        let got = guest_get(&key, ssh, url);
        assert!(got.is_err(), "the guest reached {what} at {url}: {got:?}");
    }
    // The per-instance limits are in place: what the guest receives shaped on its tap, what
    // it sends policed, its connections counted. (The guest reached the internet above
    // through them.)
    let tap = rec["network"]["tap"].as_str().unwrap();
    let qdisc = run("tc", &["qdisc", "show", "dev", tap]);
    assert!(qdisc.contains("tbf") && qdisc.contains("rate 400Mbit"), "{qdisc}");
    let bridge_rules = run("nft", &["list", "table", "bridge", &dirs.net.table()]);
    assert!(bridge_rules.contains("limit rate over 50000 kbytes/second"), "{bridge_rules}");

    // The drops are the agent's rules' (their counters moved), not a missing route.
    let rules = run("nft", &["list", "table", "inet", &dirs.net.table()]);
    assert!(rules.contains("counter packets"), "{rules}");
    assert!(rules.contains("ct count over 512"), "{rules}");
    assert!(rules.contains("192.88.99.0/24"), "the operator's range:\n{rules}");
    assert!(
        !rules.contains("ip daddr @blocked counter packets 0 "),
        "metadata not dropped:\n{rules}"
    );

    // A dnsmasq that dies (killed, out of memory) is started again: the guest resolves again.
    let dnsmasq = dirs.net.dnsmasq().expect("the bridge's dnsmasq");
    run("kill", &["-9", &dnsmasq.to_string()]);
    crate::support::wait::wait_until_blocking(
        "the agent to start dnsmasq again",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || match dirs.net.dnsmasq() {
            Some(pid) if pid != dnsmasq => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let answer = openssh(&key, ssh, "nslookup internet.test 2>&1; true").unwrap();
    assert!(answer.contains(crate::support::net::PUBLIC_NAME_ADDRESS), "{answer}");

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    drop(neighbour);
    wait_gone(&dirs, &id, Duration::from_secs(120)).await;
    // Nothing of its connections carries on into the next guest given its address.
    for side in ["--orig-src", "--orig-dst"] {
        let out = Command::new("conntrack").args(["-L", side, &address]).output().unwrap();
        let left = String::from_utf8_lossy(&out.stdout);
        assert!(left.trim().is_empty(), "tracked after the deletion ({side}):\n{left}");
    }
    agent.kill9();
}
