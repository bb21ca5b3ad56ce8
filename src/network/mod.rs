//! Each guest's network: a tap on the agent's bridge, an address the agent allocates and
//! records, DHCP and DNS from a dnsmasq of the agent's, and nftables rules that let a guest
//! reach the internet and nothing else (DESIGN.md "VM network"). Containers get the same
//! rules on the agent's Docker network.
//!
//! Why not QEMU's user-mode network: it maps the guest's gateway to the host's loopback (every
//! guest reaches every service the host keeps on 127.0.0.1) and is slow.
//!
//! Published ports: frpc's `localIP` is the guest's own address (`tunnel::config`), a path in
//! the kernel that an agent restart never cuts; `127.0.0.1:<host port>` reaches the guest too,
//! through a forward of the agent's (`forward`), for local mode and for the host's own tools.

pub mod dnsmasq;
pub mod forward;
pub mod host;
pub mod link;
pub mod rules;
pub mod subnet;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use host::HostNetwork;
pub use subnet::Subnet;

/// A guest's place on the agent's bridge, kept in its instance record.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub mac: String,
    /// The host side of the guest's NIC (`<bridge>-<host number>`).
    pub tap: String,
}

/// The host's settings for guests' networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSettings {
    /// The VMs' bridge (`QUDATA_VM_BRIDGE`); the agent's tables are named after it.
    pub bridge: String,
    pub subnet: Subnet,
    /// The containers' bridge (the agent's Docker network), `<bridge>c`.
    pub container_bridge: String,
    pub container_subnet: Subnet,
    /// DNS servers the guests' resolver asks; `None`: the host's (`/etc/resolv.conf`).
    pub dns_upstream: Option<Vec<Ipv4Addr>>,
    /// Egress and ingress limit of each VM, in Mbit/s.
    pub bandwidth_mbit: Option<u32>,
    /// Connections one guest may have tracked at once.
    pub conntrack_limit: Option<u32>,
    /// The operator's IPv4 ranges (`a.b.c.d/len`) guests never reach, besides the built-in
    /// ones (`QUDATA_VM_BLOCKED`: a provider's host endpoints, the data centre's public
    /// management ranges).
    pub blocked: Vec<String>,
    /// Where dnsmasq's files live (`<run dir>/net/<bridge>`).
    pub run_dir: PathBuf,
    pub dnsmasq_binary: PathBuf,
}

impl NetSettings {
    /// The agent's nftables tables.
    pub fn table(&self) -> String {
        rules::table_name(&self.bridge)
    }
}

/// Checks a bridge name: lower-case letters and digits, a letter first, at most 9 (a tap is
/// `<bridge>-<number>`, and interface names have 15 bytes).
pub fn check_bridge_name(name: &str) -> Result<(), String> {
    let ok = (1..=9).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok { Ok(()) } else { Err("is not 1-9 lower-case letters and digits, a letter first".into()) }
}

/// `a.b.c.d/len` (or a bare address, a /32) with no host bits set: the form nftables takes.
pub fn parse_cidr(text: &str) -> Result<String, String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let len: u32 = match len.parse() {
        Ok(len) if len <= 32 => len,
        _ => return Err(format!("{len:?} is not a prefix length 0-32")),
    };
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    if u32::from(addr) & !mask != 0 {
        return Err(format!(
            "{text} has host bits set (the network is {})",
            Ipv4Addr::from(u32::from(addr) & mask)
        ));
    }
    Ok(format!("{addr}/{len}"))
}

/// Setting up or taking down guests' networking failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A program the agent runs for it is missing or failed.
    #[error("`{program} {args}` failed: {detail}")]
    Command { program: String, args: String, detail: String },
    /// A file or device operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Files(#[from] crate::fsutil::FsError),
    /// No guest address is free.
    #[error("no free guest address left in {subnet}")]
    Exhausted { subnet: Subnet },
    /// dnsmasq (DHCP and DNS for guests) did not start.
    #[error("dnsmasq for {bridge} did not start: {detail}")]
    Dnsmasq { bridge: String, detail: String },
}

impl NetworkError {
    fn io(what: impl Into<String>, source: std::io::Error) -> NetworkError {
        NetworkError::Io { what: what.into(), source }
    }
}
