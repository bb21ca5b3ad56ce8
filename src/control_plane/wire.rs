//! Bodies of the control-plane calls (PROTOCOL.md §1). Field names and types are **compat**:
//! the golden tests pin them byte for byte.

use serde::{Deserialize, Serialize};

use crate::instance::model::Status;
use crate::secret::Secret;

/// `POST /init` request.
#[derive(Clone, Debug, Serialize)]
pub struct InitRequest {
    pub agent_id: String,
    pub agent_port: u16,
    pub address: String,
    pub fingerprint: String,
    pub pid: u32,
    pub version: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub test_mode: bool,
    /// New, optional: `"qemu"` or `"docker"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'static str>,
    /// New, optional: how many GPUs this host offers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

/// `POST /init` answer `data`; unknown fields are ignored, missing ones take their default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct InitResponse {
    pub secret_key: Option<Secret>,
    pub host_exists: bool,
    pub frp: Option<FrpInit>,
    /// Older servers: the subdomain, when `frp.subdomain` is absent.
    pub tunnel_token: Option<String>,
    pub instance_running: Option<bool>,
}

/// FRP server credentials as `/init` sends them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct FrpInit {
    pub server_addr: Option<String>,
    pub server_port: Option<u16>,
    pub token: Option<Secret>,
    pub subdomain: Option<String>,
}

/// `POST /init/host`: every key always present.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostRegistration {
    pub gpu_name: String,
    pub gpu_amount: u32,
    /// GiB of memory per GPU.
    pub vram: f64,
    pub max_cuda: f64,
    pub location: Location,
    pub configuration: Configuration,
    /// New, optional: each offered GPU's health.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpu_health: Vec<GpuHealth>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Location {
    pub city: String,
    pub country: String,
    pub region: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Configuration {
    pub ram: Amount,
    pub disk: Amount,
    pub cpu_name: String,
    pub cpu_cores: u32,
    /// GHz, highest over cores.
    pub cpu_freq: f64,
    pub memory_speed: u32,
    /// Link speed, Mbit/s.
    pub ethernet_in: f64,
    pub ethernet_out: f64,
    pub capacity: f64,
    pub max_cuda_version: f64,
}

/// A size in GiB, sent as `{"amount": 64.0, "unit": "gb"}`.
#[derive(Clone, Debug, Serialize)]
pub struct Amount {
    pub amount: f64,
    pub unit: &'static str,
}

impl Amount {
    pub fn gb(amount: f64) -> Amount {
        Amount { amount, unit: "gb" }
    }
}

impl Default for Amount {
    fn default() -> Self {
        Amount::gb(0.0)
    }
}

/// `gpu_name` as the control plane indexes it: `"NVIDIA H100 80GB HBM3"` → `"H10080GBHBM3"`.
pub fn gpu_name(marketing: &str) -> String {
    let name = marketing.trim();
    let name = name.strip_prefix("NVIDIA ").unwrap_or(name);
    name.chars().filter(|c| !c.is_whitespace()).collect()
}

/// `POST /stats`: the flat **compat** keys, then the optional per-GPU list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub gpu_util: f64,
    pub gpu_temp: i64,
    pub cpu_util: f64,
    pub ram_util: f64,
    pub mem_util: f64,
    pub inet_in: u64,
    pub inet_out: u64,
    pub status: Status,
    /// New, optional; the flat GPU keys carry the first GPU.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuStats>,
    /// New, optional: each offered GPU's health.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpu_health: Vec<GpuHealth>,
}

/// One GPU in `/stats` `gpus` (defined beside the code that measures it).
pub use crate::gpu::GpuStats;
/// One GPU in `gpu_health` (defined beside the code that decides it).
pub use crate::gpu::health::GpuHealth;

#[cfg(test)]
mod tests;
