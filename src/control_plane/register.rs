//! Registration at start-up: `/ping` until the control plane answers, `/init`, then
//! `/init/host` when the control plane does not know this host yet.

use std::path::Path;

use super::backoff::Backoff;
use super::client::Client;
use super::error::ClientError;
use super::identity::Identity;
use super::wire::{self, Amount, Configuration, HostRegistration, InitRequest, Location};
use crate::host::{self, HostFacts};
use crate::secret::Secret;

/// What registration settled.
#[derive(Debug)]
pub struct Registered {
    pub secret: Secret,
    /// The control plane's view of the lease (recovery policy, PROTOCOL.md §4).
    pub instance_running: Option<bool>,
}

/// Host facts the registration sends, read when `/init/host` is due.
pub struct HostProbe<'a> {
    pub roots: &'a host::Roots,
    pub data_dir: &'a Path,
    /// What the GPU layer knows (`gpu::facts`); `None` on a host without GPUs (fields sent
    /// empty, one warning).
    pub gpu: Option<GpuFacts>,
    /// Each offered GPU's health (new, optional `gpu_health`); empty without GPUs.
    pub gpu_health: Vec<crate::gpu::health::GpuHealth>,
}

pub use crate::gpu::GpuFacts;

/// Registers, trying again with back-off until it succeeds: a control plane that is down or
/// refuses is logged and waited for, never a reason to exit. `on_secret` runs as soon as a
/// secret is known (before `/init/host`), so the API opens as early as possible.
pub async fn register(
    client: &Client,
    identity: &mut Identity,
    request: &InitRequest,
    probe: &HostProbe<'_>,
    on_secret: &(dyn Fn(&Secret) + Sync),
) -> Registered {
    let mut attempt = 0u32;
    loop {
        match register_once(client, identity, request, probe, on_secret).await {
            Ok(done) => {
                tracing::info!(agent_id = %identity.agent_id, "registered with the control plane");
                return done;
            }
            Err(e) => {
                let pause = Backoff::STARTUP.delay(attempt);
                // Loud on the first failure and about once a minute after, quiet in between.
                if attempt.is_multiple_of(12) {
                    tracing::warn!(error = %e, attempt, "cannot register with the control plane yet; retrying until it answers");
                } else {
                    tracing::debug!(error = %e, attempt, ?pause, "registration retry failed");
                }
                tokio::time::sleep(pause).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

async fn register_once(
    client: &Client,
    identity: &mut Identity,
    request: &InitRequest,
    probe: &HostProbe<'_>,
    on_secret: &(dyn Fn(&Secret) + Sync),
) -> Result<Registered, ClientError> {
    client.ping().await?;
    let init = client.init(request).await?;
    identity.apply_init(&init)?;
    let secret = identity.secret().cloned().ok_or(ClientError::NoSecret)?;
    on_secret(&secret);
    if !init.host_exists {
        let facts = host::facts::probe(probe.roots, probe.data_dir);
        let mut body = host_registration(&facts, probe.gpu.as_ref());
        body.gpu_health = probe.gpu_health.clone();
        client.init_host(&secret, &body).await?;
        tracing::info!("host hardware registered with the control plane");
    }
    Ok(Registered { secret, instance_running: init.instance_running })
}

/// The `/init/host` body from the host facts; logs once what is unknown.
pub fn host_registration(facts: &HostFacts, gpu: Option<&GpuFacts>) -> HostRegistration {
    // Not measurable here (need dmidecode, a location service or the GPU layer).
    let mut unknown: Vec<&str> = facts.unknown.clone();
    unknown.extend(["memory_speed", "capacity", "location"]);
    tracing::warn!(fields = %unknown.join(", "), "host facts unknown, sent as 0 or \"\"");
    let gpu_unknown = gpu.map(GpuFacts::unknown).unwrap_or_else(|| GpuFacts::default().unknown());
    if !gpu_unknown.is_empty() {
        tracing::warn!(fields = %gpu_unknown.join(", "), "GPU facts unknown, sent as \"\" or 0");
    }
    let gpu = gpu.cloned().unwrap_or_default();
    HostRegistration {
        gpu_name: wire::gpu_name(&gpu.name),
        gpu_amount: gpu.count,
        vram: gpu.vram_gib,
        max_cuda: gpu.max_cuda,
        location: Location::default(),
        configuration: Configuration {
            ram: Amount::gb(round2(facts.ram_gib)),
            disk: Amount::gb(round2(facts.disk_gib)),
            cpu_name: facts.cpu_name.clone(),
            cpu_cores: facts.cpu_cores,
            cpu_freq: facts.cpu_freq_ghz,
            memory_speed: 0,
            ethernet_in: facts.link_mbps,
            ethernet_out: facts.link_mbps,
            capacity: 0.0,
            max_cuda_version: gpu.max_cuda,
        },
        gpu_health: Vec::new(),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_body_carries_the_facts() {
        let facts = HostFacts {
            cpu_name: "Intel Xeon".into(),
            cpu_cores: 64,
            cpu_freq_ghz: 3.8,
            ram_gib: 503.777,
            disk_gib: 1862.644,
            link_mbps: 25000.0,
            unknown: Vec::new(),
        };
        let body = serde_json::to_value(host_registration(&facts, None)).unwrap();
        let c = &body["configuration"];
        assert_eq!(c["ram"], serde_json::json!({"amount": 503.78, "unit": "gb"}));
        assert_eq!(c["disk"], serde_json::json!({"amount": 1862.64, "unit": "gb"}));
        assert_eq!(
            (c["cpu_name"].as_str(), c["cpu_cores"].as_u64()),
            (Some("Intel Xeon"), Some(64))
        );
        assert_eq!((c["cpu_freq"].as_f64(), c["ethernet_in"].as_f64()), (Some(3.8), Some(25000.0)));
        assert_eq!(c["ethernet_out"], c["ethernet_in"]);
        assert_eq!((body["gpu_name"].as_str(), body["gpu_amount"].as_u64()), (Some(""), Some(0)));

        let gpu = GpuFacts {
            name: "NVIDIA H100 80GB HBM3".into(),
            count: 8,
            vram_gib: 80.0,
            max_cuda: 12.4,
        };
        let body = serde_json::to_value(host_registration(&facts, Some(&gpu))).unwrap();
        assert_eq!(body["gpu_name"], "H10080GBHBM3");
        assert_eq!((body["gpu_amount"].as_u64(), body["vram"].as_f64()), (Some(8), Some(80.0)));
        assert_eq!(body["max_cuda"], 12.4);
        assert_eq!(body["configuration"]["max_cuda_version"], 12.4);
    }
}
