//! Best-effort public address of the host, for `/init` `address`.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

/// The source address the kernel would use towards the internet, if it is a public IPv4;
/// else `0.0.0.0` (the control plane then uses the address it sees). Connecting a UDP socket
/// only looks up the route: no packet is sent.
pub fn detect_public_ipv4() -> IpAddr {
    let local = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect((Ipv4Addr::new(1, 1, 1, 1), 53)).map(|()| s))
        .and_then(|s| s.local_addr());
    match local.map(|a| a.ip()) {
        Ok(IpAddr::V4(v4)) if is_public(v4) => IpAddr::V4(v4),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

/// Not private, loopback, link-local, shared (CGNAT), documentation or unspecified.
pub fn is_public(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b);
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_documentation()
        || ip.is_broadcast()
        || shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_means_routable_on_the_internet() {
        for ip in ["8.8.8.8", "185.1.2.3"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "203.0.113.7",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn detection_always_gives_an_ipv4() {
        assert!(detect_public_ipv4().is_ipv4());
    }
}
