//! Host ports (127.0.0.1, forwarded into the guest) and, for the legacy request shape, remote
//! ports on the FRP server. Nothing is kept here: what is taken is derived from the instance
//! records, which persist the allocation.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;

use rand::Rng;

use crate::instance::model::{Instance, Proto, PublishedPort};
use crate::instance::spec::PortRequest;

pub mod ephemeral;

/// Remote TCP ports used when the control plane sends legacy string `ports` (PROTOCOL.md §3).
pub const LEGACY_TCP_REMOTE: RangeInclusive<u16> = 10000..=10099;
/// Remote HTTP labels used for legacy string `ports` (PROTOCOL.md §3).
pub const LEGACY_HTTP_REMOTE: RangeInclusive<u16> = 15001..=15300;
/// Host ports the agent forwards from, on 127.0.0.1 (`QUDATA_HOST_PORTS`'s default). Below
/// Linux's default ephemeral range (32768-60999), so no outgoing connection on the host takes
/// one while its instance is stopped (see [`ephemeral`]).
pub const HOST_PORTS: RangeInclusive<u16> = 20000..=22999;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error("no free host port left in {first}-{last}")]
    HostExhausted { first: u16, last: u16 },
    #[error("no free remote {proto:?} port left in {first}-{last}")]
    RemoteExhausted { proto: Proto, first: u16, last: u16 },
    #[error("remote port {port} is already used by another instance on this host")]
    RemoteTaken { port: u16 },
}

/// Ports already held by other instances.
#[derive(Default, Debug)]
pub struct Taken {
    pub host: HashSet<u16>,
    pub remote: HashSet<u16>,
}

impl Taken {
    pub fn from_ports<'a>(ports: impl IntoIterator<Item = &'a PublishedPort>) -> Taken {
        let mut taken = Taken::default();
        for p in ports {
            taken.host.insert(p.host_port);
            taken.remote.insert(p.remote_port);
        }
        taken
    }

    /// Everything the given instances hold: published ports and management ports.
    pub fn from_instances<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Taken {
        let mut taken = Taken::default();
        for i in instances {
            let of_one = Taken::from_ports(&i.ports);
            taken.host.extend(of_one.host);
            taken.remote.extend(of_one.remote);
            taken.host.extend(i.management_port);
        }
        taken
    }
}

/// One more free host port, not among `taken` nor `also_taken`.
pub fn allocate_host(
    taken: &Taken,
    also_taken: &[PublishedPort],
    host_range: RangeInclusive<u16>,
) -> Result<u16, PortError> {
    let mut used = taken.host.clone();
    used.extend(also_taken.iter().map(|p| p.host_port));
    pick(&host_range, &used, host_port_is_free)
        .ok_or(PortError::HostExhausted { first: *host_range.start(), last: *host_range.end() })
}

/// True when nothing listens on 127.0.0.1:`port` right now.
pub fn host_port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Gives every requested port a host port and a remote port.
pub fn allocate(
    requests: &[PortRequest],
    taken: &Taken,
    host_range: RangeInclusive<u16>,
) -> Result<Vec<PublishedPort>, PortError> {
    let mut host_used = taken.host.clone();
    let mut remote_used = taken.remote.clone();
    for r in requests.iter().filter_map(|r| r.remote_port) {
        if remote_used.contains(&r) {
            return Err(PortError::RemoteTaken { port: r });
        }
        remote_used.insert(r);
    }
    let mut out = Vec::with_capacity(requests.len());
    for req in requests {
        let host_port =
            pick(&host_range, &host_used, host_port_is_free).ok_or(PortError::HostExhausted {
                first: *host_range.start(),
                last: *host_range.end(),
            })?;
        host_used.insert(host_port);
        let remote_port = match req.remote_port {
            Some(r) => r,
            None => {
                let range = match req.proto {
                    Proto::Tcp => LEGACY_TCP_REMOTE,
                    Proto::Http => LEGACY_HTTP_REMOTE,
                };
                let r = pick(&range, &remote_used, |_| true).ok_or(PortError::RemoteExhausted {
                    proto: req.proto,
                    first: *range.start(),
                    last: *range.end(),
                })?;
                remote_used.insert(r);
                r
            }
        };
        out.push(PublishedPort {
            guest_port: req.guest_port,
            host_port,
            remote_port,
            proto: req.proto,
        });
    }
    Ok(out)
}

/// First port from a random start that is neither used nor refused by `usable`. The random
/// start keeps two agents (tests in parallel) from racing for the same port.
fn pick(
    range: &RangeInclusive<u16>,
    used: &HashSet<u16>,
    usable: impl Fn(u16) -> bool,
) -> Option<u16> {
    let (first, last) = (u32::from(*range.start()), u32::from(*range.end()));
    let len = last - first + 1;
    let start = rand::rng().random_range(0..len);
    (0..len).map(|i| (first + (start + i) % len) as u16).find(|p| !used.contains(p) && usable(*p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(guest: u16, remote: Option<u16>, proto: Proto) -> PortRequest {
        PortRequest { guest_port: guest, remote_port: remote, proto }
    }

    #[test]
    fn legacy_ports_get_remote_ports_from_their_ranges() {
        let got = allocate(
            &[req(22, None, Proto::Tcp), req(8888, None, Proto::Http)],
            &Taken::default(),
            HOST_PORTS,
        )
        .unwrap();
        assert!(LEGACY_TCP_REMOTE.contains(&got[0].remote_port));
        assert!(LEGACY_HTTP_REMOTE.contains(&got[1].remote_port));
        assert_ne!(got[0].host_port, got[1].host_port);
        assert!(got.iter().all(|p| HOST_PORTS.contains(&p.host_port)));
    }

    #[test]
    fn taken_ports_are_skipped_and_exhaustion_is_reported() {
        let mut taken = Taken::default();
        taken.remote.extend(LEGACY_TCP_REMOTE);
        let err = allocate(&[req(22, None, Proto::Tcp)], &taken, HOST_PORTS).unwrap_err();
        assert!(matches!(err, PortError::RemoteExhausted { .. }));

        let taken = Taken { host: (32762..=32763).collect(), ..Taken::default() };
        let got = allocate(&[req(22, Some(10001), Proto::Tcp)], &taken, 32762..=32764).unwrap();
        assert_eq!(got[0].host_port, 32764);
        let err = allocate(
            &[req(22, Some(10001), Proto::Tcp), req(80, Some(10002), Proto::Http)],
            &taken,
            32762..=32764,
        )
        .unwrap_err();
        assert_eq!(err, PortError::HostExhausted { first: 32762, last: 32764 });
    }

    #[test]
    fn a_busy_host_port_is_not_handed_out() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let busy = listener.local_addr().unwrap().port();
        assert!(!host_port_is_free(busy));
        let err = allocate(&[req(22, Some(1), Proto::Tcp)], &Taken::default(), busy..=busy);
        assert!(err.is_err());
    }

    #[test]
    fn a_management_port_avoids_published_and_held_ports() {
        let taken = Taken { host: [32762].into(), ..Taken::default() };
        let published = [PublishedPort {
            guest_port: 22,
            host_port: 32763,
            remote_port: 10001,
            proto: Proto::Tcp,
        }];
        assert_eq!(allocate_host(&taken, &published, 32762..=32764), Ok(32764));
        assert_eq!(
            allocate_host(&taken, &published, 32762..=32763),
            Err(PortError::HostExhausted { first: 32762, last: 32763 })
        );
    }

    #[test]
    fn a_remote_port_held_by_another_instance_is_refused() {
        let taken = Taken { remote: [10001].into(), ..Taken::default() };
        let err = allocate(&[req(22, Some(10001), Proto::Tcp)], &taken, HOST_PORTS).unwrap_err();
        assert_eq!(err, PortError::RemoteTaken { port: 10001 });
    }
}
