//! Which backend builds instances on this host, and building it.
//!
//! A backend that cannot work here is not an error at start-up: the agent still registers,
//! reports and serves, and every create answers 503 with the reason given here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::qemu::accel::{self, Accel};
use crate::backend::qemu::disk;
use crate::backend::qemu::{QemuBackend, QemuSettings};
use crate::backend::{Backend, EventSink};
use crate::config::{BackendChoice, Config};
use crate::guest::ManagementKey;
use crate::vfio::{SysfsRoot, Vfio};

/// Boot-to-SSH allowance: software emulation is an order of magnitude slower than KVM.
const BOOT_DEADLINE_KVM: Duration = Duration::from_secs(180);
const BOOT_DEADLINE_TCG: Duration = Duration::from_secs(420);
/// Time a guest gets to act on the ACPI power button before QEMU is told to quit.
const POWERDOWN_GRACE: Duration = Duration::from_secs(30);

/// The default base image when `QUDATA_BASE_IMAGE` is unset.
pub fn default_base_image(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("images").join("base.qcow2")
}

/// The VFIO side of this host, as the settings place it.
pub fn vfio(cfg: &Config) -> Vfio {
    Vfio::new(SysfsRoot::new(&cfg.sysfs_root), &cfg.data_dir)
}

/// Builds the configured backend, or says in one sentence why none can run here.
pub async fn build(cfg: &Config, events: EventSink) -> Result<Arc<dyn Backend>, String> {
    match cfg.backend {
        BackendChoice::Docker => {
            Err("QUDATA_BACKEND=docker, but this build has no Docker backend yet".into())
        }
        BackendChoice::Qemu | BackendChoice::Auto => {
            let backend = qemu(cfg, events).await?;
            Ok(Arc::new(backend))
        }
    }
}

/// A backend good only for finding, stopping and removing what the agent made, never for
/// launching: no accelerator probe, no base image or firmware needed. For `recover`, and for
/// the agent's start-up recovery when no backend can run here.
pub fn for_cleanup(cfg: &Config, events: EventSink) -> Arc<dyn Backend> {
    let ovmf = disk::detect_ovmf(
        cfg.ovmf_code.as_deref(),
        cfg.ovmf_vars.as_deref(),
        disk::OVMF_CANDIDATES,
    )
    .unwrap_or(disk::Ovmf { code: PathBuf::new(), vars_template: PathBuf::new() });
    let settings = QemuSettings {
        qemu_img: disk::qemu_img_for(&cfg.qemu_binary),
        qemu_binary: cfg.qemu_binary.clone(),
        ovmf,
        accel: Accel::Tcg,
        base_image: cfg.base_image.clone().unwrap_or_else(|| default_base_image(cfg)),
        images_dir: cfg.data_dir.join("images"),
        data_dir: cfg.data_dir.clone(),
        run_dir: cfg.run_dir.clone(),
        boot_deadline: BOOT_DEADLINE_TCG,
        powerdown_grace: POWERDOWN_GRACE,
        proc_root: Default::default(),
        vfio: Arc::new(vfio(cfg)),
    };
    // Never used to reach a guest: a throwaway key, nothing written.
    Arc::new(QemuBackend::new(settings, ManagementKey::generate(), events))
}

async fn qemu(cfg: &Config, events: EventSink) -> Result<QemuBackend, String> {
    let ovmf = disk::detect_ovmf(
        cfg.ovmf_code.as_deref(),
        cfg.ovmf_vars.as_deref(),
        disk::OVMF_CANDIDATES,
    )
    .map_err(|e| e.to_string())?;
    let base_image = cfg.base_image.clone().unwrap_or_else(|| default_base_image(cfg));
    if !base_image.is_file() {
        return Err(format!(
            "the base VM image {} is missing; build one with image-builder/build-ci-guest.sh \
             or set QUDATA_BASE_IMAGE",
            base_image.display()
        ));
    }
    let accel = accel::choose(cfg.qemu_accel, &cfg.qemu_binary, &cfg.run_dir)
        .await
        .map_err(|e| e.to_string())?;
    let key =
        ManagementKey::load_or_create(&cfg.data_dir.join("keys")).map_err(|e| e.to_string())?;
    let settings = QemuSettings {
        qemu_img: disk::qemu_img_for(&cfg.qemu_binary),
        qemu_binary: cfg.qemu_binary.clone(),
        ovmf,
        accel,
        base_image,
        images_dir: cfg.data_dir.join("images"),
        data_dir: cfg.data_dir.clone(),
        run_dir: cfg.run_dir.clone(),
        boot_deadline: match accel {
            Accel::Kvm => BOOT_DEADLINE_KVM,
            Accel::Tcg => BOOT_DEADLINE_TCG,
        },
        powerdown_grace: POWERDOWN_GRACE,
        proc_root: Default::default(),
        vfio: Arc::new(vfio(cfg)),
    };
    tracing::info!(accel = accel.as_str(), base = %settings.base_image.display(), "QEMU backend ready");
    Ok(QemuBackend::new(settings, key, events))
}
