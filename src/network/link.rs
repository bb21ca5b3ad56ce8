//! The kernel side of the guests' network: the bridge, taps, IPv4 forwarding and traffic
//! limits, through `ip`, `tc` and `nft` (argv only, never a shell) and the tun device.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::NetworkError;
use super::subnet::{Subnet, bridge_mac};

/// How long one `ip`, `tc` or `nft` may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `program args…` with `stdin` fed in, and fails with what it said when it fails.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetworkError> {
    let failed = |detail: String| NetworkError::Command {
        program: program.to_owned(),
        args: args.join(" "),
        detail,
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    let pipe = child.stdin.take();
    let finished = async move {
        if let (Some(text), Some(mut pipe)) = (stdin, pipe) {
            pipe.write_all(text.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    // The child is killed with the future (`kill_on_drop`) when the deadline passes.
    let output = tokio::time::timeout(COMMAND_DEADLINE, finished)
        .await
        .map_err(|_| failed(format!("no answer within {} s", COMMAND_DEADLINE.as_secs())))?
        .map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    let said = crate::text::printable(said.trim(), 400);
    Err(failed(format!("{}: {said}", output.status)))
}

/// Whether an interface exists.
pub fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The bridge `name` with the subnet's gateway address, up, without IPv6 (the host has no
/// address a guest could reach over IPv6). Idempotent: an existing bridge is set the same way.
pub async fn ensure_bridge(name: &str, subnet: &Subnet) -> Result<(), NetworkError> {
    if !exists(name) {
        run("ip", &["link", "add", "name", name, "type", "bridge"], None).await?;
    }
    disable_ipv6(name)?;
    // ARP answers only for the bridge's own address: a guest cannot list the host's others.
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/arp_ignore"), "1")?;
    run("ip", &["link", "set", "dev", name, "address", &bridge_mac(subnet)], None).await?;
    let address = format!("{}/{}", subnet.gateway(), subnet.prefix());
    run("ip", &["addr", "replace", &address, "dev", name], None).await?;
    run("ip", &["link", "set", "dev", name, "up"], None).await
}

/// IPv4 forwarding on: guests reach the internet through the host (libvirt and Docker turn it
/// on the same way; the agent's rules decide what may pass).
pub fn enable_forwarding() -> Result<(), NetworkError> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
}

/// Removes an interface if there is one.
pub async fn delete(name: &str) -> Result<(), NetworkError> {
    if !exists(name) {
        return Ok(());
    }
    run("ip", &["link", "del", "dev", name], None).await
}

fn disable_ipv6(name: &str) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    // No IPv6 in the kernel: nothing to disable.
    if !Path::new(&path).exists() {
        return Ok(());
    }
    write_sysctl(&path, "1")
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetworkError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|e| NetworkError::io(format!("write {path}"), e))
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `queues` queues of the tap `name`, making it (not persistent: it goes when the last
/// queue is closed, that is with the QEMU that holds them, so no tap outlives its VM).
pub fn open_tap(name: &str, queues: usize) -> Result<Vec<OwnedFd>, NetworkError> {
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    if name.len() >= libc::IFNAMSIZ {
        let too_long = std::io::Error::from(std::io::ErrorKind::InvalidInput);
        return Err(NetworkError::io(format!("tap name {name}"), too_long));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
    let mut fds = Vec::with_capacity(queues);
    for _ in 0..queues.max(1) {
        let tun = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| NetworkError::io("open /dev/net/tun", e))?;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (name, flags, padding to
        // the kernel's 40 bytes); the fd is ours and open.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(NetworkError::io(format!("create tap {name}"), e));
        }
        fds.push(OwnedFd::from(tun));
    }
    Ok(fds)
}

/// `/dev/vhost-net` once per queue, where the host has it (the data path in the kernel).
pub fn open_vhost(queues: usize) -> Option<Vec<OwnedFd>> {
    (0..queues.max(1))
        .map(|_| {
            File::options().read(true).write(true).open("/dev/vhost-net").ok().map(OwnedFd::from)
        })
        .collect()
}

/// Puts a tap on the bridge and up.
pub async fn attach(tap: &str, bridge: &str) -> Result<(), NetworkError> {
    disable_ipv6(tap)?;
    run("ip", &["link", "set", "dev", tap, "master", bridge], None).await?;
    isolate(tap).await?;
    run("ip", &["link", "set", "dev", tap, "up"], None).await
}

/// The argv of `tc` that shape what a guest receives (its tap's egress) to `mbit`. What it
/// sends is policed by the nftables rules (`rules::BridgeRules::bandwidth_mbit`).
pub fn limit_command(tap: &str, mbit: u32) -> Vec<String> {
    let rate = format!("{mbit}mbit");
    // A burst of 10 ms at the rate, at least 64 KiB (tbf needs more than one MTU per tick).
    let burst = format!("{}", (u64::from(mbit) * 1_000_000 / 8 / 100).max(64 << 10));
    [
        "qdisc", "replace", "dev", tap, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "50ms",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect()
}

/// Applies (again) the shaping of a tap, or removes it (`None`).
pub async fn limit(tap: &str, mbit: Option<u32>) -> Result<(), NetworkError> {
    match mbit {
        Some(mbit) => {
            let args = limit_command(tap, mbit);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("tc", &args, None).await
        }
        // Nothing to remove is fine: the tap may never have had limits.
        None => run("tc", &["qdisc", "del", "dev", tap, "root"], None).await.or(Ok(())),
    }
}

/// Isolates a bridge port: it exchanges frames with the bridge itself (the host), never with
/// another isolated port.
pub async fn isolate(port: &str) -> Result<(), NetworkError> {
    run("ip", &["link", "set", "dev", port, "type", "bridge_slave", "isolated", "on"], None).await
}

/// Isolates every port of `bridge` (a Docker network's veths, which Docker names).
pub async fn isolate_ports(bridge: &str) -> Result<(), NetworkError> {
    let dir = Path::new("/sys/class/net").join(bridge).join("brif");
    let ports: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for port in ports {
        isolate(&port).await?;
    }
    Ok(())
}

/// The taps on `bridge`'s naming scheme (`<bridge>-<n>`) present on the host.
pub fn taps_of(bridge: &str) -> Vec<String> {
    let prefix = format!("{bridge}-");
    let mut found: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.strip_prefix(&prefix).is_some_and(|r| r.parse::<u32>().is_ok()))
        .collect();
    found.sort();
    found
}

/// Forgets every connection the kernel tracks to or from `address` (a guest that is gone), so
/// none carries on into the next guest given that address. `conntrack` reports "0 flow entries"
/// with status 1: nothing to forget is fine.
pub async fn forget_connections(address: std::net::Ipv4Addr) -> Result<(), NetworkError> {
    let address = address.to_string();
    for side in ["--orig-src", "--orig-dst"] {
        match run("conntrack", &["-D", side, &address], None).await {
            Err(NetworkError::Command { detail, .. }) if detail.contains("0 flow entries") => {}
            other => other?,
        }
    }
    Ok(())
}

/// Whether the `inet` table `name` exists (for `recover`'s report).
pub async fn table_exists(name: &str) -> bool {
    run("nft", &["list", "table", "inet", name], None).await.is_ok()
}

/// Applies an nftables script in one transaction.
pub async fn nft(script: &str) -> Result<(), NetworkError> {
    run("nft", &["-f", "-"], Some(script)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaping_has_a_burst_of_ten_milliseconds() {
        assert_eq!(
            limit_command("qudata0-5", 100).join(" "),
            "qdisc replace dev qudata0-5 root tbf rate 100mbit burst 125000 latency 50ms"
        );
        assert!(limit_command("t", 1).join(" ").contains("burst 65536"), "at least 64 KiB");
    }
}
