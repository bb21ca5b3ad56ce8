//! What may go into frpc's files. Called by the instance manager at create (a refusal is a 400)
//! and again before a file is written, so a bad value never reaches frpc's strict parser.

use std::collections::HashSet;

use super::TunnelError;
use super::config::{InstanceTunnels, TunnelProto, proxy_name};

/// Longest proxy name accepted; frp keys its proxy table, metrics and server logs by it.
pub const MAX_PROXY_NAME: usize = 128;

/// A proxy name: ASCII letters, digits, `-` and `_` only (`.` is frp's user prefix separator).
pub fn is_proxy_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_PROXY_NAME
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One DNS label (the subdomain part of a custom domain).
pub fn is_subdomain(v: &str) -> bool {
    crate::config::is_dns_label(v)
}

/// Checks an instance's tunnels: the subdomain is a DNS label, every proxy name is valid, ports
/// are in range and neither guest nor remote ports repeat. Pure, and blind to `host_port`, so
/// the instance manager can call it at create (before host ports are allocated) and answer 400.
pub fn validate_instance(agent_id: &str, tunnels: &InstanceTunnels) -> Result<(), TunnelError> {
    let invalid = |what: &str, value: &str, hint| TunnelError::Invalid {
        what: what.to_owned(),
        value: value.to_owned(),
        hint,
    };
    const NAME: &str = "use letters, digits, '-' and '_' only (a proxy name has at most 128)";
    const TWICE: &str = "publish each guest port and each remote port once";
    if !is_subdomain(&tunnels.subdomain) {
        return Err(invalid(
            "subdomain",
            &tunnels.subdomain,
            "use a DNS label: letters, digits, '-'",
        ));
    }
    if tunnels.instance_id.is_empty() || !is_proxy_name(&tunnels.instance_id) {
        return Err(invalid("instance id", &tunnels.instance_id, NAME));
    }
    let mut guest = HashSet::new();
    let mut remote = HashSet::new();
    for p in &tunnels.ports {
        let name = proxy_name(agent_id, &tunnels.instance_id, p.container_port);
        if !is_proxy_name(&name) {
            return Err(invalid("proxy name", &name, NAME));
        }
        if p.container_port == 0 {
            return Err(invalid("guest port", "0", "use a port 1-65535"));
        }
        if p.proto == TunnelProto::Tcp && p.remote_port == 0 {
            return Err(invalid("remote port", "0", "a tcp port needs a remote port 1-65535"));
        }
        if !guest.insert(p.container_port) {
            return Err(invalid("guest port", &p.container_port.to_string(), TWICE));
        }
        // Two http proxies may share a label only if their domains differ, and they do
        // exactly when their remote ports differ, so one rule covers both protocols.
        if !remote.insert((p.proto, p.remote_port)) {
            return Err(invalid("remote port", &p.remote_port.to_string(), TWICE));
        }
    }
    Ok(())
}

/// What the agent itself holds on the FRP server: its own proxy's domain (the host's bare
/// subdomain) and the server's own port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub subdomain: String,
    pub server_port: u16,
}

/// Remote ports an instance's tcp proxy may never take: the server's own, and the HTTP and
/// HTTPS ports its virtual hosts answer on.
fn reserved_tcp_ports(reserved: &Reserved) -> [u16; 3] {
    [reserved.server_port, 80, 443]
}

/// Checks that no proxy of an instance takes what the agent holds: an http proxy whose domain
/// is the agent's own (the bare subdomain: remote port 80 or 443 without a `tunnel_token` of
/// its own, or a token naming the agent's subdomain) would compete with the agent's proxy on
/// the server, and whenever it won, the control plane's requests, secret included, would
/// reach the renter. Pure.
pub fn not_reserved(tunnels: &InstanceTunnels, reserved: &Reserved) -> Result<(), TunnelError> {
    let invalid = |what: &str, value: String, hint| TunnelError::Invalid {
        what: what.to_owned(),
        value,
        hint,
    };
    for p in &tunnels.ports {
        match p.proto {
            TunnelProto::Http => {
                let domain = super::config::http_domain(&tunnels.subdomain, p.remote_port);
                if domain.eq_ignore_ascii_case(&reserved.subdomain) {
                    return Err(invalid(
                        "http domain",
                        format!("{domain} (remote port {})", p.remote_port),
                        "it is the agent's own; an http port on remote port 80 or 443 needs a tunnel_token subdomain of its own",
                    ));
                }
            }
            TunnelProto::Tcp if reserved_tcp_ports(reserved).contains(&p.remote_port) => {
                return Err(invalid(
                    "remote port",
                    p.remote_port.to_string(),
                    "the FRP server uses it itself; pick another remote port",
                ));
            }
            TunnelProto::Tcp => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::config::TunnelPort;

    const AGENT: &str = "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c";

    #[test]
    fn no_instance_proxy_takes_the_agents_domain_or_the_servers_ports() {
        let reserved = Reserved { subdomain: "host-7".into(), server_port: 7000 };
        let ok = |sub: &str, ports: &[(u16, u16, TunnelProto)]| {
            not_reserved(&instance(sub, ports), &reserved)
        };
        use TunnelProto::{Http, Tcp};
        // The host's subdomain on another remote port is its own domain, not the agent's.
        assert!(ok("host-7", &[(8888, 20000, Http), (22, 10001, Tcp)]).is_ok());
        // A token of its own may use 80 and 443.
        assert!(ok("renter-token", &[(8888, 443, Http), (8080, 80, Http)]).is_ok());
        for (sub, port) in [("host-7", 80), ("host-7", 443), ("HOST-7", 443)] {
            let err = ok(sub, &[(8888, port, Http)]).unwrap_err().to_string();
            assert!(err.contains("the agent's own"), "{sub} {port}: {err}");
        }
        for port in [7000, 80, 443] {
            let err = ok("host-7", &[(22, port, Tcp)]).unwrap_err().to_string();
            assert!(err.contains("the FRP server uses it"), "{port}: {err}");
        }
    }

    fn instance(subdomain: &str, ports: &[(u16, u16, TunnelProto)]) -> InstanceTunnels {
        InstanceTunnels {
            instance_id: "i-1".into(),
            subdomain: subdomain.into(),
            ports: ports
                .iter()
                .map(|&(container_port, remote_port, proto)| TunnelPort {
                    container_port,
                    local: std::net::SocketAddrV4::new(
                        std::net::Ipv4Addr::LOCALHOST,
                        42000 + container_port % 1000,
                    ),
                    remote_port,
                    proto,
                })
                .collect(),
        }
    }

    #[test]
    fn accepts_a_normal_instance() {
        let t =
            instance("abc-1", &[(22, 10001, TunnelProto::Tcp), (8888, 20000, TunnelProto::Http)]);
        validate_instance(AGENT, &t).unwrap();
    }

    #[test]
    fn refuses_values_frp_would_not_take() {
        let cases = [
            instance("bad.label", &[]),
            instance("-x", &[]),
            instance("a b", &[]),
            instance("ok", &[(22, 0, TunnelProto::Tcp)]),
            instance("ok", &[(22, 1, TunnelProto::Tcp), (22, 2, TunnelProto::Tcp)]),
            instance("ok", &[(22, 1, TunnelProto::Tcp), (23, 1, TunnelProto::Tcp)]),
            instance("ok", &[(0, 1, TunnelProto::Tcp)]),
        ];
        for t in cases {
            let err = validate_instance(AGENT, &t).unwrap_err();
            assert!(matches!(err, TunnelError::Invalid { .. }), "{t:?}");
        }
        let line = validate_instance(AGENT, &instance("a b", &[])).unwrap_err().to_string();
        assert_eq!(
            line,
            "invalid subdomain \"a b\" for an FRP tunnel: use a DNS label: letters, digits, '-'"
        );
        let mut t = instance("ok", &[]);
        t.instance_id = "x\"y".into();
        assert!(validate_instance(AGENT, &t).is_err());
        assert!(
            validate_instance("agent\nid", &instance("ok", &[(22, 1, TunnelProto::Tcp)])).is_err()
        );
    }

    #[test]
    fn proxy_names() {
        assert!(is_proxy_name(&proxy_name(AGENT, "0b9c4d1e-2f3a-4b5c-8d6e-7f8091a2b3c4", 65535)));
        assert!(!is_proxy_name("a.b"));
        assert!(!is_proxy_name(""));
        assert!(!is_proxy_name(&"x".repeat(MAX_PROXY_NAME + 1)));
    }
}
