//! Whether each offered GPU can be rented: `healthy`, `quarantined` (with the reason and since
//! when, persisted by [`crate::vfio::Quarantine`]) or `lost` (gone from the PCI bus). Fed by the
//! reset between tenants (in `vfio`), by a look at each GPU's config space, and by the kernel
//! log ([`super::kmsg`]); read by the instance manager (a quarantined GPU is not handed out),
//! `doctor`, `recover` and the control-plane reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::kmsg::{GpuEvent, KmsgReader};
use crate::vfio::quarantine::{Cleared, Entry};
use crate::vfio::{PciAddress, Vfio, VfioError};

/// The state of one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Quarantined,
    Lost,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Quarantined => "quarantined",
            Health::Lost => "lost",
        }
    }
}

/// One GPU in `/init/host` and `/stats` `gpu_health` (PROTOCOL.md, "GPU health").
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuHealth {
    pub pci: String,
    pub health: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
}

impl GpuHealth {
    /// Why it cannot be rented; `None` when it can.
    pub fn refusal(&self) -> Option<String> {
        let reason = self.reason.as_deref().unwrap_or("no reason recorded");
        match self.health {
            Health::Healthy => None,
            Health::Lost => Some(format!("GPU {} is lost: {reason}", self.pci)),
            Health::Quarantined => {
                let since = self
                    .since
                    .map(|s| s.to_rfc3339_opts(SecondsFormat::Secs, true))
                    .unwrap_or_default();
                Some(format!(
                    "GPU {} is quarantined since {since}: {reason}; check it, then run \
                     `qudata-agent gpu release-quarantine {}`",
                    self.pci, self.pci
                ))
            }
        }
    }
}

/// The offered GPUs and where their health is kept.
#[derive(Debug)]
pub struct HealthView {
    pub vfio: Arc<Vfio>,
    pub offered: Vec<PciAddress>,
    /// The host's NVML, for the GPUs still on the NVIDIA driver (`None`: not watched).
    pub nvml: Option<Arc<super::HostNvml>>,
    /// The last [`HealthView::report`], for the stats loop (the watch refreshes it).
    last: std::sync::Mutex<Option<Vec<GpuHealth>>>,
}

impl HealthView {
    pub fn new(
        vfio: Arc<Vfio>,
        offered: Vec<PciAddress>,
        nvml: Option<Arc<super::HostNvml>>,
    ) -> HealthView {
        HealthView { vfio, offered, nvml, last: std::sync::Mutex::default() }
    }

    /// The last report, without I/O once there is one: `/stats` asks every 500 ms on the async
    /// runtime, and the watch refreshes it every period.
    pub fn latest(&self) -> Vec<GpuHealth> {
        let cached = self.last.lock().expect("health cache lock").clone();
        cached.unwrap_or_else(|| self.report())
    }

    /// Every offered GPU's state now (also kept for [`HealthView::latest`]). Blocking (sysfs
    /// and one small file).
    pub fn report(&self) -> Vec<GpuHealth> {
        let report = self.read_report();
        *self.last.lock().expect("health cache lock") = Some(report.clone());
        report
    }

    fn read_report(&self) -> Vec<GpuHealth> {
        let entries = match self.vfio.quarantine.load() {
            Ok(state) => state.gpus,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the GPU quarantine: every GPU counts as quarantined");
                let since = Utc::now();
                let reason = format!("the quarantine file cannot be read: {e}");
                return self.offered.iter().map(|gpu| quarantined(gpu, &reason, since)).collect();
            }
        };
        self.offered
            .iter()
            .map(|gpu| match entries.get(gpu) {
                _ if !self.vfio.sysfs.device_exists(gpu) => GpuHealth {
                    pci: gpu.to_string(),
                    health: Health::Lost,
                    reason: Some("it is gone from the PCI bus (no longer in sysfs)".into()),
                    since: None,
                },
                Some(entry) => quarantined(gpu, &entry.reason, entry.since),
                None => GpuHealth {
                    pci: gpu.to_string(),
                    health: Health::Healthy,
                    reason: None,
                    since: None,
                },
            })
            .collect()
    }

    /// The GPUs that cannot be rented, with the sentence that says why.
    pub fn unavailable(&self) -> Vec<(String, String)> {
        self.report().into_iter().filter_map(|h| Some((h.pci.clone(), h.refusal()?))).collect()
    }

    /// Quarantines each present GPU whose config space does not answer (all ones: fallen
    /// off the bus). Blocking.
    pub fn check_bus(&self) {
        for gpu in &self.offered {
            if !self.vfio.sysfs.device_exists(gpu) {
                continue; // lost: reported as such, nothing to quarantine
            }
            if let Err(e @ (VfioError::OffTheBus { .. } | VfioError::WrongVendor { .. })) =
                self.vfio.check_alive(gpu)
            {
                self.quarantine(gpu, e.to_string());
            }
        }
    }

    /// Quarantines each offered GPU on the NVIDIA driver that NVML finds unfit (pages or rows
    /// waiting to be retired or remapped, a failed remapping). Blocking.
    pub fn check_nvml(&self) {
        let Some(found) = self.nvml.as_ref().and_then(|n| n.with(super::Nvml::health)) else {
            return;
        };
        for (gpu, reason) in found {
            if self.offered.contains(&gpu) {
                self.quarantine(&gpu, reason);
            }
        }
    }

    /// Quarantines the GPU of a kernel log event unless an operator released it after the
    /// event (same boot, later time).
    pub fn note(&self, event: &GpuEvent, boot_id: &str) {
        if !self.offered.contains(&event.gpu) {
            return;
        }
        let cleared =
            self.vfio.quarantine.load().ok().and_then(|s| s.cleared.get(&event.gpu).cloned());
        if cleared.is_some_and(|c| c.covers(boot_id, event.micros)) {
            return;
        }
        self.quarantine(&event.gpu, event.reason.clone());
    }

    fn quarantine(&self, gpu: &PciAddress, reason: String) {
        let entry = Entry { reason, since: Utc::now(), kept_on_vfio: Vec::new() };
        if let Err(e) = self.vfio.quarantine.add(gpu, entry) {
            tracing::error!(%gpu, error = %e, "cannot record a GPU's quarantine");
        }
    }

    /// Watches the kernel log and the GPUs' config space for as long as the agent runs, on a
    /// thread of its own (the reads block). The log is read from its start: an Xid logged
    /// while the agent was down counts too.
    pub fn watch(self: Arc<Self>, kmsg: PathBuf) {
        if self.offered.is_empty() {
            return;
        }
        let boot_id = Cleared::now(&self.vfio.proc_root).boot_id;
        let spawned = std::thread::Builder::new().name("gpu-health".into()).spawn(move || {
            let mut reader = match KmsgReader::open(&kmsg) {
                Ok(reader) => Some(reader),
                Err(e) => {
                    tracing::warn!(path = %kmsg.display(), error = %e, "cannot read the kernel log: GPU Xid errors are not watched");
                    None
                }
            };
            for round in 0u64.. {
                for record in reader.as_mut().map(KmsgReader::read_new).unwrap_or_default() {
                    if let Some(event) = super::kmsg::parse_record(&record) {
                        self.note(&event, &boot_id);
                    }
                }
                // Less often: a config-space read wakes an idle GPU from its low-power state.
                if round.is_multiple_of(BUS_CHECK_EVERY) {
                    self.check_bus();
                }
                self.check_nvml();
                self.report();
                std::thread::sleep(WATCH_PERIOD);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the GPU health watch");
        }
    }
}

/// `qudata-agent gpu health`: one line per offered GPU (or JSON).
pub fn health_command(cfg: &crate::config::Config, json: bool) -> Result<String, String> {
    let vfio = Arc::new(crate::agent::backends::vfio(cfg));
    let offered = super::pool::offered(&vfio.sysfs, cfg.gpu_pci_addrs.as_deref())
        .map_err(|e| e.to_string())?;
    let report = HealthView::new(vfio, offered, None).report();
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&report).expect("serialises")));
    }
    if report.is_empty() {
        return Ok("no GPU is offered on this host\n".into());
    }
    let lines: Vec<String> = report
        .iter()
        .map(|h| match h.refusal() {
            None => format!("{}  healthy\n", h.pci),
            Some(why) => format!("{}  {}: {why}\n", h.pci, h.health.as_str()),
        })
        .collect();
    Ok(lines.concat())
}

/// `qudata-agent gpu release-quarantine <addr>`: the GPU's kept functions back to their
/// drivers, the quarantine lifted, kernel log lines about it up to now ignored from then on.
pub fn release_command(cfg: &crate::config::Config, address: &str) -> Result<String, String> {
    let gpu: PciAddress =
        address.parse().map_err(|e: crate::vfio::pci::BadPciAddress| e.to_string())?;
    let vfio = crate::agent::backends::vfio(cfg);
    let cleared = Cleared::now(&vfio.proc_root);
    match vfio.release_quarantine(&gpu, cleared).map_err(|e| e.to_string())? {
        Some(entry) => Ok(format!(
            "{gpu}: released from quarantine (it was quarantined since {}: {}); it is offered again\n",
            entry.since.to_rfc3339_opts(SecondsFormat::Secs, true),
            entry.reason
        )),
        None => {
            Err(format!("GPU {gpu} is not quarantined; `qudata-agent gpu health` lists the GPUs"))
        }
    }
}

/// How often the kernel log and NVML are looked at.
const WATCH_PERIOD: Duration = Duration::from_secs(2);
/// The config spaces every this many periods (10 s).
const BUS_CHECK_EVERY: u64 = 5;

fn quarantined(gpu: &PciAddress, reason: &str, since: DateTime<Utc>) -> GpuHealth {
    GpuHealth {
        pci: gpu.to_string(),
        health: Health::Quarantined,
        reason: Some(reason.to_owned()),
        since: Some(since),
    }
}
