//! The agent's nftables rules, as one script built by a pure function (golden-tested) and
//! applied in one transaction: the tables are replaced whole, so what the kernel holds is
//! always exactly what the live instances need, after a crash as after a create.
//!
//! Two tables of the agent's own, named after its bridge, and nothing in anyone else's
//! (Docker's included):
//! - `inet`: what a guest may reach through the host. The host itself only for DHCP and DNS
//!   on the bridge's address (input); through it, the internet only: no private, CGNAT,
//!   link-local (the metadata address), loopback, multicast or reserved range, no IPv6; new
//!   connections from outside never reach a guest (forward); guests are masqueraded behind the
//!   host's address.
//! - `bridge`: what a guest may send on the bridge: nothing to another port (guests never see
//!   each other, broadcasts included), and only from its own MAC and IPv4 address.

use std::fmt::Write;

use super::GuestNet;
use super::subnet::Subnet;

/// Destinations a guest never reaches through the host (IANA special-purpose ranges that are
/// not the public internet, and cloud hosts' own endpoints; documentation ranges are left
/// alone: nothing routes them).
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    // Azure's host endpoint (WireServer): public, but the host's own.
    "168.63.129.16/32",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

/// One bridge of the agent's and what lives on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeRules {
    pub bridge: String,
    pub subnet: Subnet,
    /// The host answers DHCP and DNS on the bridge's address (VMs; containers use Docker's).
    pub host_services: bool,
    /// Guests whose tap is known: each may send only from its own MAC and address.
    pub guests: Vec<GuestNet>,
    /// New connections one guest address may have tracked at once.
    pub conntrack_limit: Option<u32>,
    /// What each guest may send, in Mbit/s.
    pub bandwidth_mbit: Option<u32>,
}

/// The name of the agent's tables (one `inet`, one `bridge`) for the host's bridge `bridge`.
pub fn table_name(bridge: &str) -> String {
    format!("qudata_{bridge}")
}

/// Script that replaces the agent's tables with rules for `bridges` (none: removes them).
/// `also_blocked`: the operator's ranges guests never reach either (`QUDATA_VM_BLOCKED`).
pub fn ruleset(table: &str, bridges: &[BridgeRules], also_blocked: &[String]) -> String {
    let mut s = removal(table);
    if bridges.is_empty() {
        return s;
    }
    inet_table(&mut s, table, bridges, also_blocked);
    bridge_table(&mut s, table, bridges);
    s
}

/// Script that removes the agent's tables, present or not.
pub fn removal(table: &str) -> String {
    let mut s = String::new();
    for family in ["inet", "bridge"] {
        // Declaring a table first makes the delete succeed when there is none.
        let _ = writeln!(s, "table {family} {table}\ndelete table {family} {table}");
    }
    s
}

fn inet_table(s: &mut String, table: &str, bridges: &[BridgeRules], also_blocked: &[String]) {
    let _ = writeln!(s, "table inet {table} {{");
    // auto-merge: the operator's ranges may overlap the built-in ones.
    let _ = writeln!(s, "\tset blocked {{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge");
    let blocked: Vec<&str> =
        BLOCKED.iter().copied().chain(also_blocked.iter().map(String::as_str)).collect();
    let _ = writeln!(s, "\t\telements = {{ {} }}\n\t}}", blocked.join(", "));
    // Before the usual filter priority, so a drop here is final whatever other tables say.
    let _ = writeln!(
        s,
        "\tchain input {{\n\t\ttype filter hook input priority filter - 10; policy accept;"
    );
    for b in bridges {
        let _ = writeln!(s, "\t\tiifname \"{0}\" jump to_host_{0}", b.bridge);
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(
        s,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter - 10; policy accept;"
    );
    for b in bridges {
        let _ = writeln!(s, "\t\tiifname \"{0}\" jump from_{0}", b.bridge);
        let _ = writeln!(s, "\t\toifname \"{0}\" jump to_{0}", b.bridge);
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    for b in bridges {
        let _ = writeln!(s, "\t\tip saddr {} oifname != \"{}\" masquerade", b.subnet, b.bridge);
    }
    let _ = writeln!(s, "\t}}");
    for b in bridges {
        bridge_chains(s, b, bridges);
    }
    let _ = writeln!(s, "}}");
}

fn bridge_chains(s: &mut String, b: &BridgeRules, all: &[BridgeRules]) {
    let name = &b.bridge;
    let gateway = b.subnet.gateway();
    // To the host itself, on any of its addresses: replies to what the host opened (the
    // agent's SSH, frpc), DHCP and DNS; nothing else.
    let _ = writeln!(s, "\tchain to_host_{name} {{\n\t\tct state established,related accept");
    if b.host_services {
        // DHCP to the bridge's address or broadcast only: no other DHCP server of the host's.
        let _ = writeln!(
            s,
            "\t\tip saddr {{ 0.0.0.0, {} }} ip daddr {{ {gateway}, 255.255.255.255 }} udp sport \
             68 udp dport 67 accept",
            b.subnet
        );
        let _ =
            writeln!(s, "\t\tip daddr {gateway} meta l4proto {{ tcp, udp }} th dport 53 accept");
    }
    let _ = writeln!(s, "\t\tcounter drop\n\t}}");
    // Through the host: the internet only, IPv4 only, from the guests' own addresses.
    let _ = writeln!(s, "\tchain from_{name} {{\n\t\tmeta nfproto != ipv4 counter drop");
    let _ = writeln!(s, "\t\tip saddr != {} counter drop", b.subnet);
    let _ = writeln!(s, "\t\tip daddr @blocked counter drop");
    for other in all {
        let _ = writeln!(s, "\t\toifname \"{}\" counter drop", other.bridge);
    }
    if let Some(limit) = b.conntrack_limit {
        let _ = writeln!(
            s,
            "\t\tct state new add @conns_{name} {{ ip saddr ct count over {limit} }} counter drop"
        );
    }
    let _ = writeln!(s, "\t}}");
    // Into the guests: replies only. Published ports are reached from the host (frpc, the
    // agent's forwards), which is output, not forward.
    let _ = writeln!(s, "\tchain to_{name} {{\n\t\tct state established,related accept");
    let _ = writeln!(s, "\t\tcounter drop\n\t}}");
    if b.conntrack_limit.is_some() {
        let _ = writeln!(s, "\tset conns_{name} {{\n\t\ttype ipv4_addr\n\t\tsize 65535");
        let _ = writeln!(s, "\t\tflags dynamic\n\t}}");
    }
}

fn bridge_table(s: &mut String, table: &str, bridges: &[BridgeRules]) {
    let _ = writeln!(s, "table bridge {table} {{");
    let _ = writeln!(
        s,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;"
    );
    // From a VM's tap to any other port: one guest's frames never reach another's, broadcasts
    // included. (Containers' ports are Docker's veths: `link::isolate_ports` isolates them.)
    for b in bridges.iter().filter(|b| b.host_services) {
        let _ = writeln!(s, "\t\tiifname \"{}-*\" counter drop", b.bridge);
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority filter; policy accept;"
    );
    let guests = || bridges.iter().flat_map(|b| b.guests.iter().map(move |g| (b, g)));
    for (_, g) in guests() {
        let _ = writeln!(s, "\t\tiifname \"{}\" jump {}", g.tap, guest_chain(g));
    }
    let _ = writeln!(s, "\t}}");
    for (b, g) in guests() {
        let (mac, addr) = (&g.mac, g.address);
        let _ = writeln!(s, "\tchain {} {{", guest_chain(g));
        let _ = writeln!(s, "\t\tether saddr != {mac} counter drop");
        let _ = writeln!(s, "\t\tether type != {{ ip, arp }} counter drop");
        let _ = writeln!(s, "\t\tarp saddr ether != {mac} counter drop");
        let _ = writeln!(s, "\t\tarp saddr ip != {{ 0.0.0.0, {addr} }} counter drop");
        if let Some(mbit) = b.bandwidth_mbit {
            // What the guest sends, policed here; what it receives is shaped on its tap.
            let kbytes = u64::from(mbit) * 125;
            let burst = (kbytes / 100).max(64);
            let _ = writeln!(
                s,
                "\t\tlimit rate over {kbytes} kbytes/second burst {burst} kbytes counter drop"
            );
        }
        // DHCP: a few requests a second, each for the tap's own MAC (BOOTP's chaddr, 28 bytes
        // into the UDP payload), so a guest can neither flood dnsmasq nor release or decline
        // another guest's address.
        let chaddr = g.mac.replace(':', "");
        let _ = writeln!(s, "\t\tudp dport 67 limit rate over 10/second counter drop");
        let _ = writeln!(s, "\t\tudp dport 67 @th,288,48 != 0x{chaddr} counter drop");
        // A DHCP client has no address yet.
        let _ = writeln!(s, "\t\tip saddr 0.0.0.0 udp sport 68 udp dport 67 accept");
        let _ = writeln!(s, "\t\tip saddr != {addr} counter drop\n\t}}");
    }
    let _ = writeln!(s, "}}");
}

fn guest_chain(g: &GuestNet) -> String {
    format!("guest_{}", g.tap.replace('-', "_"))
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
