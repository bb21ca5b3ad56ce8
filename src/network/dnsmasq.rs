//! DHCP and DNS for the guests on the bridge: one dnsmasq per bridge, started by the agent,
//! kept across agent restarts (found again by its pidfile and command line) and stopped with
//! the last guest.
//!
//! DHCP hands out only the addresses the agent allocated (one `dhcp-host` line per guest, by
//! MAC; `static` range: no pool for strangers). DNS forwards to the host's resolvers (which
//! a guest cannot reach itself: they are often on loopback or a private address) and drops
//! answers that point at private addresses, so DNS cannot name the host's networks to a guest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::link::run;
use super::{GuestNet, NetSettings, NetworkError};

/// dnsmasq's files for one bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsmasqFiles {
    pub conf: PathBuf,
    pub hosts: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

impl DnsmasqFiles {
    pub fn new(dir: &Path) -> DnsmasqFiles {
        DnsmasqFiles {
            conf: dir.join("dnsmasq.conf"),
            hosts: dir.join("dhcp-hosts"),
            pidfile: dir.join("dnsmasq.pid"),
            log: dir.join("dnsmasq.log"),
        }
    }
}

/// The configuration file of the bridge's dnsmasq.
pub fn config(settings: &NetSettings, files: &DnsmasqFiles, user: &str) -> String {
    let subnet = &settings.subnet;
    let mut lines = vec![
        // Only the bridge, only its address: never the host's other interfaces.
        format!("interface={}", settings.bridge),
        "except-interface=lo".to_owned(),
        format!("listen-address={}", subnet.gateway()),
        "bind-interfaces".to_owned(),
        format!("user={user}"),
        format!("pid-file={}", files.pidfile.display()),
        format!("log-facility={}", files.log.display()),
        // Each guest's address is its for the VM's life: a lease that never runs out keeps it
        // even while dnsmasq is down (the agent starts it again, see `HostNetwork::watch`).
        format!("dhcp-range={},static,{},infinite", subnet.network(), subnet.netmask()),
        format!("dhcp-hostsfile={}", files.hosts.display()),
        "dhcp-authoritative".to_owned(),
        "leasefile-ro".to_owned(),
        "no-ping".to_owned(),
        // Not a line per DHCP packet: what a guest sends must not fill the host's /run.
        "quiet-dhcp".to_owned(),
        format!("dhcp-option=option:router,{}", subnet.gateway()),
        format!("dhcp-option=option:dns-server,{}", subnet.gateway()),
        "no-hosts".to_owned(),
        "domain-needed".to_owned(),
        "bogus-priv".to_owned(),
        "stop-dns-rebind".to_owned(),
        "cache-size=1000".to_owned(),
    ];
    match &settings.dns_upstream {
        Some(servers) => {
            lines.push("no-resolv".to_owned());
            lines.extend(servers.iter().map(|s| format!("server={s}")));
        }
        None => lines.push("resolv-file=/etc/resolv.conf".to_owned()),
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The `dhcp-hostsfile`: each guest's MAC and address.
pub fn hosts(guests: &[GuestNet]) -> String {
    guests.iter().map(|g| format!("{},{}\n", g.mac, g.address)).collect()
}

/// The user dnsmasq runs as once its sockets are open: Debian's own, else `nobody`.
fn run_as() -> &'static str {
    if crate::sysuser::lookup("dnsmasq").is_some() { "dnsmasq" } else { "nobody" }
}

/// The running dnsmasq of these files, if any: the pid in its pidfile whose command line names
/// its configuration file.
pub fn find(files: &DnsmasqFiles) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(&files.pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let wanted = format!("--conf-file={}", files.conf.display());
    cmdline.split(|b| *b == 0).any(|arg| arg == wanted.as_bytes()).then_some(pid)
}

/// Makes sure the bridge's dnsmasq runs with the current configuration and knows `guests`:
/// the hosts file is rewritten (then a running one is told to read it), a missing or
/// differently configured one is started.
pub async fn ensure(settings: &NetSettings, guests: &[GuestNet]) -> Result<(), NetworkError> {
    let files = DnsmasqFiles::new(&settings.run_dir);
    public_dir(&settings.run_dir)?;
    // dnsmasq reads the hosts file after dropping root; it holds no secret.
    write_public(&files.hosts, &hosts(guests))?;
    let conf = config(settings, &files, run_as());
    let same_conf = std::fs::read_to_string(&files.conf).is_ok_and(|old| old == conf);
    if let Some(pid) = find(&files) {
        if same_conf {
            signal(pid, libc::SIGHUP);
            return Ok(());
        }
        stop(&files).await;
    }
    write_public(&files.conf, &conf)?;
    start(settings, &files).await
}

async fn start(settings: &NetSettings, files: &DnsmasqFiles) -> Result<(), NetworkError> {
    let failed = |detail: String| NetworkError::Dnsmasq { bridge: settings.bridge.clone(), detail };
    let binary = settings.dnsmasq_binary.display().to_string();
    let conf = format!("--conf-file={}", files.conf.display());
    // The launcher returns once the daemon has its sockets and has written its pidfile, with
    // a failure's reason on stderr.
    run(&binary, &[&conf], None).await.map_err(|e| failed(e.to_string()))?;
    find(files).map(drop).ok_or_else(|| failed("it exited at once; see its log".into()))
}

/// Stops the dnsmasq of these files, if it runs (SIGTERM, then SIGKILL after 5 s).
pub async fn stop(files: &DnsmasqFiles) {
    let Some(pid) = find(files) else { return };
    signal(pid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while find(files).is_some() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if find(files).is_some() {
        signal(pid, libc::SIGKILL);
    }
    let _ = std::fs::remove_file(&files.pidfile);
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a pid whose command line was just checked to be this dnsmasq.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

fn write_public(path: &Path, text: &str) -> Result<(), NetworkError> {
    use std::os::unix::fs::PermissionsExt;
    crate::fsutil::write_atomic(path, text.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| NetworkError::io(format!("chmod {}", path.display()), e))
}

/// dnsmasq reads its files after dropping root: their directory is readable (nothing in it
/// is secret) and the two above it (`<run dir>/net`, the run dir, 0700 under the unit's
/// `UMask=0077`) traversable, as for QEMU's user.
fn public_dir(dir: &Path) -> Result<(), NetworkError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let what = |d: &Path| format!("make {} readable", d.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| NetworkError::io(what(dir), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| NetworkError::io(what(dir), e))?;
    for above in dir.ancestors().skip(1).take(2) {
        let mode = std::fs::metadata(above).map_err(|e| NetworkError::io(what(above), e))?;
        let mode = mode.permissions().mode() & 0o7777;
        if mode & 0o011 != 0o011 {
            std::fs::set_permissions(above, std::fs::Permissions::from_mode(mode | 0o011))
                .map_err(|e| NetworkError::io(what(above), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::network::Subnet;

    fn settings(upstream: Option<Vec<Ipv4Addr>>) -> NetSettings {
        NetSettings {
            bridge: "qudata0".into(),
            subnet: "10.213.0.0/24".parse::<Subnet>().unwrap(),
            container_bridge: "qudata0c".into(),
            container_subnet: "10.213.1.0/24".parse::<Subnet>().unwrap(),
            dns_upstream: upstream,
            bandwidth_mbit: None,
            conntrack_limit: None,
            blocked: Vec::new(),
            run_dir: "/run/qudata/net/qudata0".into(),
            dnsmasq_binary: "dnsmasq".into(),
        }
    }

    #[test]
    fn config_serves_the_bridge_only() {
        let s = settings(Some(vec![Ipv4Addr::new(198, 51, 100, 2)]));
        let files = DnsmasqFiles::new(&s.run_dir);
        assert_eq!(
            config(&s, &files, "dnsmasq"),
            "interface=qudata0\nexcept-interface=lo\nlisten-address=10.213.0.1\n\
             bind-interfaces\nuser=dnsmasq\npid-file=/run/qudata/net/qudata0/dnsmasq.pid\n\
             log-facility=/run/qudata/net/qudata0/dnsmasq.log\n\
             dhcp-range=10.213.0.0,static,255.255.255.0,infinite\n\
             dhcp-hostsfile=/run/qudata/net/qudata0/dhcp-hosts\ndhcp-authoritative\n\
             leasefile-ro\nno-ping\nquiet-dhcp\ndhcp-option=option:router,10.213.0.1\n\
             dhcp-option=option:dns-server,10.213.0.1\nno-hosts\ndomain-needed\nbogus-priv\n\
             stop-dns-rebind\ncache-size=1000\nno-resolv\nserver=198.51.100.2\n"
        );
        assert!(
            config(&settings(None), &files, "nobody").ends_with("resolv-file=/etc/resolv.conf\n")
        );
    }

    #[test]
    fn hosts_file_has_one_line_per_guest() {
        let g = |last: u8| GuestNet {
            address: Ipv4Addr::new(10, 213, 0, last),
            mac: crate::network::subnet::guest_mac(Ipv4Addr::new(10, 213, 0, last)),
            tap: format!("qudata0-{last}"),
        };
        assert_eq!(
            hosts(&[g(2), g(3)]),
            "52:54:00:d5:00:02,10.213.0.2\n52:54:00:d5:00:03,10.213.0.3\n"
        );
        assert_eq!(hosts(&[]), "");
    }
}
