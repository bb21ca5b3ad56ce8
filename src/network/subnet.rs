//! The guests' IPv4 subnet: the bridge's address (the first host), guest addresses, and the
//! names and MAC addresses derived from an address (unique because addresses are).

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A private IPv4 network, `/16` to `/29`, given as its network address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// The private ranges a guests' subnet may come from (RFC 1918).
const PRIVATE: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Subnet, String> {
        if !(16..=29).contains(&prefix) {
            return Err(format!("prefix /{prefix} is outside /16-/29"));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(format!("{network} is not the network address of a /{prefix}"));
        }
        if !PRIVATE.iter().any(|(net, len)| Subnet { network: *net, prefix: *len }.covers(&subnet))
        {
            return Err("is not inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16".into());
        }
        Ok(subnet)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }

    fn covers(&self, other: &Subnet) -> bool {
        other.prefix >= self.prefix && self.contains(other.network)
    }

    /// The host's address on the bridge: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }

    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + n)
    }

    /// The host number of `addr` in this subnet (`10.0.0.5` in `10.0.0.0/24`: 5).
    pub fn host_number(&self, addr: Ipv4Addr) -> Option<u32> {
        self.contains(addr).then(|| u32::from(addr) - u32::from(self.network))
    }

    /// Whether `addr` may be a guest's: inside, not the network, gateway or broadcast address.
    pub fn is_guest(&self, addr: Ipv4Addr) -> bool {
        self.host_number(addr).is_some_and(|n| n >= 2 && n < self.size() - 1)
    }

    /// The first guest address not in `taken`.
    pub fn allocate(&self, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (2..self.size() - 1).map(|n| self.nth(n)).find(|a| !taken.contains(a))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let (addr, prefix) = s.split_once('/').ok_or("is not an address/prefix")?;
        let addr: Ipv4Addr =
            addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 =
            prefix.parse().map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Subnet::new(addr, prefix)
    }
}

/// The MAC address of the guest at `addr`: QEMU's prefix and the address's last three bytes,
/// so no two guests of a subnet (at most a /16) share one.
pub fn guest_mac(addr: Ipv4Addr) -> String {
    let [_, b, c, d] = addr.octets();
    format!("52:54:00:{b:02x}:{c:02x}:{d:02x}")
}

/// The bridge's own MAC address: fixed, so it does not follow its ports as taps come and go
/// (a bridge takes the lowest of its ports' addresses otherwise, and guests' ARP caches go stale).
pub fn bridge_mac(subnet: &Subnet) -> String {
    guest_mac(subnet.gateway())
}

/// The tap of the guest at `addr` on `bridge`: `<bridge>-<host number>` (at most 15 bytes for
/// a bridge name of at most 9).
pub fn tap_name(bridge: &str, subnet: &Subnet, addr: Ipv4Addr) -> Option<String> {
    subnet.host_number(addr).map(|n| format!("{bridge}-{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_private_networks_only() {
        assert_eq!(subnet("10.213.0.0/24").gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(subnet("192.168.50.0/29").netmask(), Ipv4Addr::new(255, 255, 255, 248));
        for bad in ["10.213.0.1/24", "8.8.8.0/24", "10.0.0.0/8", "10.0.0.0/30", "10.0.0.0", "x/24"]
        {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert!("172.32.0.0/24".parse::<Subnet>().is_err(), "outside 172.16.0.0/12");
    }

    #[test]
    fn allocates_the_first_free_guest_address() {
        let s = subnet("10.9.8.0/29");
        let mut taken = HashSet::new();
        for last in 2..=6 {
            let addr = s.allocate(&taken).expect("an address");
            assert_eq!(addr, Ipv4Addr::new(10, 9, 8, last));
            assert!(s.is_guest(addr));
            taken.insert(addr);
        }
        assert_eq!(s.allocate(&taken), None, "network, gateway and broadcast are never given");
        assert!(!s.is_guest(Ipv4Addr::new(10, 9, 8, 7)));
        assert!(!s.is_guest(Ipv4Addr::new(10, 9, 8, 1)));
    }

    #[test]
    fn operator_ranges_are_checked() {
        use crate::network::parse_cidr;
        assert_eq!(parse_cidr("203.0.113.0/24").unwrap(), "203.0.113.0/24");
        assert_eq!(parse_cidr("198.51.100.7").unwrap(), "198.51.100.7/32");
        assert!(parse_cidr("203.0.113.1/24").unwrap_err().contains("203.0.113.0"));
        for bad in ["203.0.113.0/33", "host/24", "1.2.3/8", ""] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_macs_come_from_the_address() {
        let s = subnet("10.213.0.0/16");
        let addr = Ipv4Addr::new(10, 213, 3, 7);
        assert_eq!(tap_name("qudata0", &s, addr).as_deref(), Some("qudata0-775"));
        assert_eq!(guest_mac(addr), "52:54:00:d5:03:07");
        assert_eq!(bridge_mac(&s), "52:54:00:d5:00:01");
        let longest = tap_name("abcdefghi", &s, Ipv4Addr::new(10, 213, 255, 254)).unwrap();
        assert!(longest.len() <= 15, "{longest}");
    }
}
