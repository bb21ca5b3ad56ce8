//! `Tunnels` as the instance manager's `Publisher`: an instance's published ports become one
//! include file, its HTTP proxies on the request's `tunnel_token` or else the host's subdomain.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use async_trait::async_trait;

use super::config::{FrpCredentials, InstanceTunnels, TunnelPort, TunnelProto};
use super::{TunnelError, Tunnels, validate};
use crate::instance::PublishError;
use crate::instance::model::{Instance, Proto};
use crate::instance::spec::SpecError;

/// The adapter the agent hands to `Manager::set_publisher` (a new one for new credentials).
pub struct TunnelPublisher {
    tunnels: Arc<Tunnels>,
    /// The host's subdomain (from the FRP credentials in force).
    subdomain: String,
    /// What the agent's own proxy holds on the server: never given to an instance.
    reserved: validate::Reserved,
}

impl TunnelPublisher {
    pub fn new(tunnels: Arc<Tunnels>, creds: &FrpCredentials) -> TunnelPublisher {
        let reserved = validate::Reserved {
            subdomain: creds.subdomain.clone(),
            server_port: creds.server_port,
        };
        TunnelPublisher { tunnels, subdomain: creds.subdomain.clone(), reserved }
    }
}

/// What frpc is told about one instance. Pure.
///
/// A VM on the agent's bridge is reached at its own address: the path stays in the kernel, and
/// an agent restart never cuts a renter's connection (the agent's `127.0.0.1` forwards are for
/// local mode and the host's tools). A container, or a VM recorded before the bridge, at its
/// port on 127.0.0.1.
pub fn instance_tunnels(instance: &Instance, host_subdomain: &str) -> InstanceTunnels {
    let subdomain = instance.spec.tunnel_token.as_deref().unwrap_or(host_subdomain);
    let local = |p: &crate::instance::model::PublishedPort| match &instance.network {
        Some(guest) => SocketAddrV4::new(guest.address, p.guest_port),
        None => SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.host_port),
    };
    let ports = instance
        .ports
        .iter()
        .map(|p| TunnelPort {
            container_port: p.guest_port,
            local: local(p),
            remote_port: p.remote_port,
            proto: match p.proto {
                Proto::Tcp => TunnelProto::Tcp,
                Proto::Http => TunnelProto::Http,
            },
        })
        .collect();
    InstanceTunnels { instance_id: instance.id.clone(), subdomain: subdomain.to_owned(), ports }
}

fn boxed(e: TunnelError) -> PublishError {
    PublishError(Box::new(e))
}

/// A tunnel refusal as a create-request error naming the request field at fault.
fn spec_error(e: TunnelError) -> SpecError {
    let field = match &e {
        TunnelError::Invalid { what, .. } if what == "subdomain" => "tunnel_token",
        TunnelError::Invalid { what, .. } if what == "instance id" => "id",
        _ => "ports",
    };
    SpecError { field: field.to_owned(), reason: e.to_string() }
}

#[async_trait]
impl crate::instance::Publisher for TunnelPublisher {
    fn validate(&self, instance: &Instance) -> Result<(), SpecError> {
        let tunnels = instance_tunnels(instance, &self.subdomain);
        validate::validate_instance(self.tunnels.agent_id(), &tunnels).map_err(spec_error)?;
        validate::not_reserved(&tunnels, &self.reserved).map_err(spec_error)
    }

    async fn publish(&self, instance: &Instance) -> Result<BTreeMap<u16, String>, PublishError> {
        let tunnels = instance_tunnels(instance, &self.subdomain);
        // Checked again: an instance admitted under other credentials (a new subdomain).
        validate::not_reserved(&tunnels, &self.reserved).map_err(boxed)?;
        let report = self.tunnels.publish(&tunnels).await.map_err(boxed)?;
        Ok(report.errors())
    }

    async fn unpublish(&self, instance_id: &str) -> Result<(), PublishError> {
        self.tunnels.unpublish(instance_id).await.map_err(boxed)
    }

    async fn errors(&self, instance_id: &str) -> BTreeMap<u16, String> {
        self.tunnels.proxy_errors(instance_id).await
    }

    fn published_ids(&self) -> Vec<String> {
        self.tunnels.published_ids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::model::PublishedPort;

    fn instance(tunnel_token: Option<&str>) -> Instance {
        let body = serde_json::json!({"ssh_enabled": true, "tunnel_token": tunnel_token});
        Instance {
            ports: vec![
                PublishedPort {
                    guest_port: 22,
                    host_port: 42022,
                    remote_port: 10001,
                    proto: Proto::Tcp,
                },
                PublishedPort {
                    guest_port: 8888,
                    host_port: 42888,
                    remote_port: 443,
                    proto: Proto::Http,
                },
            ],
            management_port: Some(42100),
            network: None,
            ..Instance::sample("0b9c4d1e", &body)
        }
    }

    #[test]
    fn maps_published_ports_and_picks_the_subdomain() {
        let t = instance_tunnels(&instance(None), "host-a1");
        let want = InstanceTunnels {
            instance_id: "0b9c4d1e".into(),
            subdomain: "host-a1".into(),
            ports: vec![
                TunnelPort {
                    container_port: 22,
                    local: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 42022),
                    remote_port: 10001,
                    proto: TunnelProto::Tcp,
                },
                TunnelPort {
                    container_port: 8888,
                    local: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 42888),
                    remote_port: 443,
                    proto: TunnelProto::Http,
                },
            ],
        };
        assert_eq!(t, want, "the management port is never published");
        assert_eq!(instance_tunnels(&instance(Some("lease-7")), "host-a1").subdomain, "lease-7");
    }

    /// A VM on the bridge is reached at its own address and guest port, not through the
    /// agent's forward on 127.0.0.1.
    #[test]
    fn a_vm_on_the_bridge_is_reached_at_its_address() {
        let address = Ipv4Addr::new(10, 213, 0, 7);
        let mac = crate::network::subnet::guest_mac(address);
        let vm = Instance {
            network: Some(crate::network::GuestNet { address, mac, tap: "qudata0-7".into() }),
            management_port: None,
            ..instance(None)
        };
        let locals: Vec<SocketAddrV4> =
            instance_tunnels(&vm, "host-a1").ports.iter().map(|p| p.local).collect();
        assert_eq!(locals, [SocketAddrV4::new(address, 22), SocketAddrV4::new(address, 8888)]);
        let include = crate::tunnel::config::include_config("agent-1", &instance_tunnels(&vm, "h"));
        let text = crate::tunnel::config::render(&include).unwrap();
        assert_eq!(
            text,
            "[[proxies]]\nname = \"agent-1-0b9c4d1e-22\"\ntype = \"tcp\"\n\
             localIP = \"10.213.0.7\"\nlocalPort = 22\nremotePort = 10001\n\n\
             [[proxies]]\nname = \"agent-1-0b9c4d1e-8888\"\ntype = \"http\"\n\
             localIP = \"10.213.0.7\"\nlocalPort = 8888\ncustomDomains = [\"h\"]\n"
        );
    }

    #[test]
    fn refusals_name_the_request_field() {
        let e = TunnelError::Invalid { what: "subdomain".into(), value: "x".into(), hint: "h" };
        assert_eq!(spec_error(e).field, "tunnel_token");
        let e = TunnelError::Invalid { what: "remote port".into(), value: "0".into(), hint: "h" };
        let e = spec_error(e);
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("ports", "invalid remote port \"0\" for an FRP tunnel: h")
        );
    }
}
