//! frpc's configuration (frp ≥ 0.52, TOML) as serde types, and the pure functions that build it.
//!
//! Key names are frp's own (`pkg/config/v1/client.go`, `proxy.go`); `deny_unknown_fields` lets
//! the agent read back the file it wrote (the admin credentials) and refuse anything else.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The main file: connection, admin API, includes and the agent's own proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    pub server_addr: String,
    pub server_port: u16,
    /// false: frpc keeps retrying a server that is down instead of exiting.
    pub login_fail_exit: bool,
    pub includes: Vec<String>,
    pub auth: AuthConfig,
    pub web_server: WebServerConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<ProxyConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Always "token".
    pub method: String,
    pub token: Secret,
}

/// frpc's admin API, which the agent alone uses (reload and status).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebServerConfig {
    pub addr: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyType {
    Tcp,
    Http,
}

/// One `[[proxies]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ProxyType,
    #[serde(rename = "localIP")]
    pub local_ip: String,
    pub local_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_domains: Vec<String>,
}

/// A per-instance include file: proxies only (frp refuses anything else in an include).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncludeFile {
    #[serde(default)]
    pub proxies: Vec<ProxyConfig>,
}

/// Where the FRP server is and how to log in (from `/init` or the QUDATA_FRP_* overrides).
#[derive(Clone, Debug, PartialEq)]
pub struct FrpCredentials {
    pub server_addr: String,
    pub server_port: u16,
    pub token: Secret,
    /// Public name of this host: `<subdomain>.<region>.qudata.ai`.
    pub subdomain: String,
}

/// Protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelProto {
    Tcp,
    Http,
}

/// One instance port to publish: reached by frpc at `local`, public on `remote_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelPort {
    pub container_port: u16,
    /// A VM's own address and port on the agent's bridge; a container's port published on
    /// 127.0.0.1.
    pub local: std::net::SocketAddrV4,
    pub remote_port: u16,
    pub proto: TunnelProto,
}

/// Everything one instance publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceTunnels {
    pub instance_id: String,
    /// The subdomain its HTTP proxies answer on (the host's, or the request's `tunnel_token`).
    pub subdomain: String,
    pub ports: Vec<TunnelPort>,
}

/// The folder of include files: `frpc.d` beside the main file.
pub fn include_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new("/")).join("frpc.d")
}

/// The include file of one instance.
pub fn include_path(main: &Path, instance_id: &str) -> PathBuf {
    include_dir(main).join(format!("{instance_id}.toml"))
}

/// Unique per FRP server, because every host shares it (PROTOCOL.md §3).
pub fn proxy_name(agent_id: &str, instance_id: &str, container_port: u16) -> String {
    format!("{agent_id}-{instance_id}-{container_port}")
}

/// The agent's own proxy name.
pub fn agent_proxy_name(agent_id: &str) -> String {
    format!("{agent_id}-agent")
}

/// `<subdomain>` on the standard ports, `<subdomain>:<port>` otherwise (PROTOCOL.md §3).
pub fn http_domain(subdomain: &str, remote_port: u16) -> String {
    match remote_port {
        80 | 443 => subdomain.to_owned(),
        port => format!("{subdomain}:{port}"),
    }
}

/// The main file's model.
pub fn main_config(
    creds: &FrpCredentials,
    admin: &WebServerConfig,
    main_path: &Path,
    agent_id: &str,
    agent_port: u16,
) -> ClientConfig {
    ClientConfig {
        server_addr: creds.server_addr.clone(),
        server_port: creds.server_port,
        login_fail_exit: false,
        includes: vec![include_dir(main_path).join("*.toml").display().to_string()],
        auth: AuthConfig { method: "token".into(), token: creds.token.clone() },
        web_server: admin.clone(),
        proxies: vec![ProxyConfig {
            name: agent_proxy_name(agent_id),
            kind: ProxyType::Http,
            local_ip: "127.0.0.1".into(),
            local_port: agent_port,
            remote_port: None,
            custom_domains: vec![creds.subdomain.clone()],
        }],
    }
}

/// The include file's model for one instance.
pub fn include_config(agent_id: &str, tunnels: &InstanceTunnels) -> IncludeFile {
    let proxies = tunnels
        .ports
        .iter()
        .map(|p| {
            let name = proxy_name(agent_id, &tunnels.instance_id, p.container_port);
            let (kind, remote_port, custom_domains) = match p.proto {
                TunnelProto::Tcp => (ProxyType::Tcp, Some(p.remote_port), Vec::new()),
                TunnelProto::Http => {
                    (ProxyType::Http, None, vec![http_domain(&tunnels.subdomain, p.remote_port)])
                }
            };
            ProxyConfig {
                name,
                kind,
                local_ip: p.local.ip().to_string(),
                local_port: p.local.port(),
                remote_port,
                custom_domains,
            }
        })
        .collect();
    IncludeFile { proxies }
}

/// TOML text of a model. Serialising these plain structs cannot fail; the error is kept for
/// the type system.
pub fn render<T: Serialize>(value: &T) -> Result<String, toml::ser::Error> {
    toml::to_string(value)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
