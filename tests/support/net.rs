//! Networks for the tests: each agent a bridge, subnets and tables of its own (so agents run
//! side by side and nothing touches the host's real ones), removed when the test ends; and
//! "the internet", a network namespace the guests' traffic is routed to (policy routing from
//! the test's subnet only: the host's own routes are never changed).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// One agent's network settings, unique in this test run.
pub struct TestNet {
    pub n: u32,
    pub bridge: String,
    pub subnet: String,
    pub container_subnet: String,
    /// Where the agent's dnsmasq keeps its pidfile (to stop it if the agent could not).
    pub run_dir: std::path::PathBuf,
}

impl TestNet {
    pub fn new(agent_run_dir: &std::path::Path) -> TestNet {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("qt{}n{}", pid % 1000, n % 1000);
        let second = 128 + pid % 64;
        let third = (n * 2) % 256;
        TestNet {
            n,
            subnet: format!("10.{second}.{third}.0/24"),
            container_subnet: format!("10.{second}.{}.0/24", third + 1),
            run_dir: agent_run_dir.join("net").join(&bridge),
            bridge,
        }
    }

    /// The agent's settings for it. DNS goes to 127.0.0.1: no query leaves the machine.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("QUDATA_VM_BRIDGE", self.bridge.clone()),
            ("QUDATA_VM_SUBNET", self.subnet.clone()),
            ("QUDATA_CONTAINER_SUBNET", self.container_subnet.clone()),
            ("QUDATA_VM_DNS", "127.0.0.1".into()),
        ]
    }

    pub fn table(&self) -> String {
        format!("qudata_{}", self.bridge)
    }

    /// The host's address on the bridge.
    pub fn gateway(&self) -> String {
        self.subnet.replace(".0/24", ".1")
    }

    /// Taps of this bridge present on the host.
    pub fn taps(&self) -> Vec<String> {
        let prefix = format!("{}-", self.bridge);
        let mut taps: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        taps.sort();
        taps
    }

    pub fn bridge_exists(&self) -> bool {
        std::path::Path::new("/sys/class/net").join(&self.bridge).exists()
    }

    /// Whether the agent's nftables table (`inet`) exists.
    pub fn table_exists(&self) -> bool {
        let out = Command::new("nft").args(["list", "tables"]).output().expect("nft");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == format!("table inet {}", self.table()))
    }

    /// The agent's dnsmasq, if one runs.
    pub fn dnsmasq(&self) -> Option<u32> {
        let pid: u32 =
            std::fs::read_to_string(self.run_dir.join("dnsmasq.pid")).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains("dnsmasq").then_some(pid)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(pid) = self.dnsmasq() {
            quiet("kill", &[&pid.to_string()]);
        }
        for tap in self.taps() {
            quiet("ip", &["link", "del", &tap]);
        }
        quiet("ip", &["link", "del", &self.bridge]);
        quiet("ip", &["link", "del", &format!("{}c", self.bridge)]);
        for family in ["inet", "bridge"] {
            quiet("nft", &["delete", "table", family, &self.table()]);
        }
    }
}

/// What `internet.test` resolves to (never contacted: the name check only reads the answer).
pub const PUBLIC_NAME_ADDRESS: &str = "192.88.99.7";

/// "The internet" for one test: a namespace holding an HTTP server and a DNS server at a
/// public-looking address (TEST-NET-2), a veth to the host, and a routing table that sends
/// the test subnet's traffic there (the host's own traffic keeps its routes).
pub struct Internet {
    pub ns: String,
    host_if: String,
    /// The namespace's address: the HTTP and DNS servers.
    pub address: String,
    /// The host's end of the veth.
    pub host_address: String,
    table: String,
    bridge: String,
}

impl Internet {
    /// For the guests of `net`'s VM bridge; the HTTP server serves `dir`.
    pub fn new(net: &TestNet, dir: &std::path::Path) -> Internet {
        Internet::for_bridge(&net.bridge, net.n, dir)
    }

    /// For whatever arrives from `bridge` (`n`: the test network's number).
    pub fn for_bridge(bridge: &str, n: u32, dir: &std::path::Path) -> Internet {
        let tag = format!("{}n{}", std::process::id() % 1000, n % 1000);
        let (ns, host_if, peer) = (format!("qin{tag}"), format!("qih{tag}"), format!("qip{tag}"));
        let base = 4 * (n % 60);
        let host_address = format!("198.51.100.{}", base + 1);
        let address = format!("198.51.100.{}", base + 2);
        let table = (20000 + n).to_string();
        quiet("ip", &["netns", "del", &ns]);
        quiet("ip", &["link", "del", &host_if]);
        run("ip", &["netns", "add", &ns]);
        run("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", &peer]);
        run("ip", &["link", "set", &peer, "netns", &ns]);
        run("ip", &["addr", "add", &format!("{host_address}/30"), "dev", &host_if]);
        run("ip", &["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        in_ns(&["ip", "addr", "add", &format!("{address}/30"), "dev", &peer]);
        in_ns(&["ip", "link", "set", &peer, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
        in_ns(&["ip", "route", "add", "default", "via", &host_address]);
        // What the guests send through the host (and only it) leaves through the namespace.
        run("ip", &["route", "add", "default", "via", &address, "table", &table]);
        run("ip", &["rule", "add", "iif", bridge, "lookup", &table, "priority", &table]);
        let web = dir.display().to_string();
        // busybox httpd daemonizes; it dies with the namespace's processes below.
        in_ns(&["busybox", "httpd", "-p", &format!("{address}:80"), "-h", &web]);
        in_ns(&["busybox", "httpd", "-p", "169.254.169.254:80", "-h", &web]);
        // A public-looking answer: the agent's resolver drops answers in private and test
        // ranges (dnsmasq's `stop-dns-rebind`), TEST-NET-2 among them.
        let record = format!("--address=/internet.test/{PUBLIC_NAME_ADDRESS}");
        in_ns(&[
            "dnsmasq",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={address}"),
            &record,
            &format!("--pid-file=/run/{ns}.dnsmasq.pid"),
        ]);
        Internet { ns, host_if, address, host_address, table, bridge: bridge.to_owned() }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        // Every process in the namespace (httpd, dnsmasq).
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                quiet("kill", &["-9", pid]);
            }
        }
        quiet("ip", &["rule", "del", "iif", &self.bridge, "lookup", &self.table]);
        quiet("ip", &["route", "flush", "table", &self.table]);
        quiet("ip", &["link", "del", &self.host_if]);
        quiet("ip", &["netns", "del", &self.ns]);
    }
}
