//! The instance as the agent keeps it: what was asked for, what was given, where it stands.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::spec::Spec;

/// Where an instance stands (PROTOCOL.md §2, **compat** strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Accepted, being built, or booting until the guest is reachable.
    Pending,
    Running,
    /// vCPUs stopped (`stop`); GPU, memory, disk and ports kept.
    Paused,
    /// Reset requested; until the guest is reachable again.
    Rebooting,
    /// Failed; the record stays (with a reason) until `DELETE`.
    Error,
    /// No instance.
    Destroyed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Rebooting => "rebooting",
            Status::Error => "error",
            Status::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a published port is carried through the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Http,
}

/// Which backend built an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Qemu,
    Docker,
}

impl BackendKind {
    /// The name used everywhere: records (serde), `QUDATA_BACKEND`, `/init`, logs, `doctor`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Docker => "docker",
        }
    }
}

/// One published port: guest port, the host port on 127.0.0.1 that forwards to it, and the
/// public port on the FRP server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub guest_port: u16,
    pub host_port: u16,
    pub remote_port: u16,
    pub proto: Proto,
}

/// The persisted record of one instance; the truth that recovery and adoption start from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub backend: BackendKind,
    pub spec: Spec,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub ports: Vec<PublishedPort>,
    /// PCI addresses of the GPUs given to this instance.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// Renter keys (OpenSSH lines), applied whenever the guest becomes reachable.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Host port forwarding to the guest's management SSH (VM backend), published to nobody.
    /// Kept apart from `ports` so that `ssh_enabled: false` still lets the agent in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_port: Option<u16>,
    /// The VM's place on the agent's bridge (address, MAC, tap), allocated at admission. A
    /// record from before the bridge existed has none (its VM keeps QEMU's user network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::GuestNet>,
    /// `DELETE` was accepted; teardown resumes after an agent restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// The VM image the instance boots (its name in the images dir), decided at admission;
    /// reported so a request that named a container image learns what runs instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_image: Option<String>,
    /// The token of the JupyterLab the agent starts when the request asks for guest port
    /// 8888 and names no `command` (returned to the control plane, never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jupyter_token: Option<crate::secret::Secret>,
}

/// The guest port JupyterLab listens on when the agent starts it.
pub const JUPYTER_PORT: u16 = 8888;

#[cfg(test)]
impl Instance {
    /// A `pending` VM record of `id` made from the create request `body` on a small host, with
    /// nothing allocated yet (unit tests set what they need).
    pub(crate) fn sample(id: &str, body: &serde_json::Value) -> Instance {
        let limits = super::spec::HostLimits {
            cpus: 2,
            memory_mib: 2048,
            storage_gb: 10,
            default_cpus: 1,
            default_memory_mib: 512,
            default_storage_gb: 5,
        };
        Instance {
            id: id.into(),
            backend: BackendKind::Qemu,
            spec: super::spec::parse_create(body, &limits).expect("a valid sample request"),
            status: Status::Pending,
            error: None,
            created_at: DateTime::from_timestamp(1_700_000_000, 0).expect("a valid time"),
            ports: Vec::new(),
            gpus: Vec::new(),
            ssh_keys: Vec::new(),
            management_port: None,
            network: None,
            deleting: false,
            vm_image: None,
            jupyter_token: None,
        }
    }
}

impl Instance {
    /// `{"22":"10001"}`: guest port → public port, both strings (**compat**).
    pub fn port_map(&self) -> BTreeMap<String, String> {
        self.ports.iter().map(|p| (p.guest_port.to_string(), p.remote_port.to_string())).collect()
    }

    /// The host port forwarding to `guest_port`, if published.
    pub fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.guest_port == guest_port).map(|p| p.host_port)
    }

    /// Short name used for process, container and file names: `qudata-<id>`.
    pub fn marker(&self) -> String {
        marker(&self.id)
    }
}

/// `qudata-<id>`: the name recovery looks for on processes and containers.
pub fn marker(id: &str) -> String {
    format!("qudata-{id}")
}
