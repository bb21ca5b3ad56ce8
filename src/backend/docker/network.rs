//! The agent's Docker network: containers get the same promise as VMs (DESIGN.md "VM
//! network"). A bridge network of the agent's (`qudata-<bridge>`, on the host bridge
//! `<QUDATA_VM_BRIDGE>c` with `QUDATA_CONTAINER_SUBNET`), no traffic between containers, ports
//! published on 127.0.0.1 by default; the agent's nftables rules (`network::rules`) keep its
//! containers from the host, private ranges, the metadata address and each other, whether or
//! not the engine runs its own iptables rules.

use std::collections::HashMap;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};

use super::engine::Engine;
use super::error::DockerError;
use super::plan::{LABEL_OWNER, is_ours_network};
use crate::network::NetSettings;

/// The network's name for the host bridge `bridge`.
pub fn network_name(bridge: &str) -> String {
    format!("qudata-{bridge}")
}

/// The `docker network create` body.
pub fn create_request(net: &NetSettings, owner: &str) -> NetworkCreateRequest {
    let subnet = &net.container_subnet;
    let options = HashMap::from([
        ("com.docker.network.bridge.name".to_owned(), net.container_bridge.clone()),
        // Docker's own isolation where it runs iptables; the agent's rules in any case.
        ("com.docker.network.bridge.enable_icc".to_owned(), "false".to_owned()),
        // A port published without an address lands on loopback, never on every address.
        ("com.docker.network.bridge.host_binding_ipv4".to_owned(), "127.0.0.1".to_owned()),
    ]);
    NetworkCreateRequest {
        name: network_name(&net.container_bridge),
        driver: Some("bridge".into()),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                gateway: Some(subnet.gateway().to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        enable_ipv6: Some(false),
        options: Some(options),
        labels: Some(HashMap::from([(LABEL_OWNER.to_owned(), owner.to_owned())])),
        ..Default::default()
    }
}

/// The network's name once it exists (made if missing). One of the same name that is not the
/// agent's is refused: the agent does not put containers on a network it does not control.
pub async fn ensure(
    engine: &Engine,
    net: &NetSettings,
    owner: &str,
) -> Result<String, DockerError> {
    let name = network_name(&net.container_bridge);
    let call = std::time::Duration::from_secs(30);
    let inspect = engine.docker.inspect_network(&name, None);
    match engine.call("inspect the agent's network", call, inspect).await {
        Ok(found) => {
            let labels = found.labels.unwrap_or_default();
            if !is_ours_network(&labels, owner) {
                return Err(DockerError::Foreign { name });
            }
            Ok(name)
        }
        Err(e) if e.is_not_found() => {
            let create = engine.docker.create_network(create_request(net, owner));
            engine.call("create the agent's network", call, create).await?;
            tracing::info!(network = %name, subnet = %net.container_subnet, "Docker network created");
            Ok(name)
        }
        Err(e) => Err(e),
    }
}
