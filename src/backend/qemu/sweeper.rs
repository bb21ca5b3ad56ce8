//! The QEMU side of sweeping the host ([`HostSweeper`]): every VM of this agent found by its
//! command line; an orphan (no record claims it) stopped, its GPUs released and its files
//! removed; a recorded VM halted for host maintenance (its files kept); a record's VM torn
//! down. It needs only where things live (data and run dir, `/proc`, sysfs): no key,
//! accelerator, firmware or base image, so `recover` and start-up cleanup build a whole one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::gpus;
use super::layout::VmPaths;
use super::procfs::ProcRoot;
use super::vm_process::{Ladder, Owner, Stopped, VmProcess};
use crate::backend::{BackendError, HostSweeper, Owned};
use crate::gpu::HostNvml;
use crate::instance::model::{BackendKind, Instance};
use crate::vfio::Vfio;

/// Where the QEMU backend keeps what it makes, and how long a guest may take to power down.
#[derive(Clone)]
pub struct QemuSweeper {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Where QEMUs are looked for (`/proc`; a tree of their own in tests).
    pub proc_root: ProcRoot,
    pub vfio: Arc<Vfio>,
    /// How long an ACPI power-down may take before QEMU is told to quit.
    pub powerdown_grace: Duration,
    /// Opened again once GPUs went back to the NVIDIA driver (the agent's own, when it
    /// reports GPU metrics).
    pub host_nvml: Option<Arc<HostNvml>>,
}

impl QemuSweeper {
    pub(super) fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(&self.data_dir, &self.run_dir, id)
    }

    /// What makes a process instance `id`'s QEMU, and where to look for it.
    pub(super) fn owner(&self, id: &str) -> Owner {
        Owner { proc: self.proc_root.clone(), run_dir: self.run_dir.clone(), id: id.to_owned() }
    }

    /// Stops every QEMU of instance `id` found by its command line, along `ladder`.
    pub(super) async fn stop_found(
        &self,
        id: &str,
        ladder: &Ladder,
    ) -> Result<Stopped, BackendError> {
        let mut how = Stopped::NotRunning;
        for process in VmProcess::scan(&self.owner(id)) {
            how = process.stop(ladder).await.map_err(|e| BackendError::op("stop QEMU", e))?;
        }
        Ok(how)
    }

    /// Returns instance `id`'s GPUs to their drivers (only once its QEMU is gone: vfio-pci
    /// cannot let go of a device QEMU holds open), and opens NVML again if any went back.
    pub(super) async fn release_gpus(&self, id: &str) -> Result<(), BackendError> {
        if gpus::release(&self.vfio, id).await? > 0
            && let Some(host) = self.host_nvml.clone()
        {
            let _ = tokio::task::spawn_blocking(move || host.reload()).await;
        }
        Ok(())
    }

    /// After QEMU is gone: the GPUs returned and every file of the VM removed.
    pub(super) async fn remove(&self, id: &str) -> Result<(), BackendError> {
        self.release_gpus(id).await?;
        let paths = self.paths(id);
        paths.remove_all().map_err(|e| BackendError::op("remove the VM's files", e))?;
        tracing::info!(%id, "VM and its files removed");
        Ok(())
    }
}

#[async_trait]
impl HostSweeper for QemuSweeper {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    async fn find_owned(&self) -> Result<Vec<Owned>, BackendError> {
        let found = self.proc_root.scan(&self.run_dir).into_iter();
        Ok(found
            .map(|f| Owned { what: format!("QEMU pid {}", f.pid), instance_id: f.instance_id })
            .collect())
    }

    /// Stops the orphan ([`Ladder::graceful`]), then returns its GPUs and removes the files
    /// the layout names (nothing else in its directories). Idempotent.
    async fn reap(&self, orphan: &Owned) -> Result<(), BackendError> {
        let id = &orphan.instance_id;
        let how = self.stop_found(id, &Ladder::graceful(self.powerdown_grace)).await?;
        self.release_gpus(id).await?;
        let removed = self
            .paths(id)
            .remove_known()
            .map_err(|e| BackendError::op("remove the orphan's files", e))?;
        tracing::info!(%id, stopped = ?how, files = removed.len(), "orphan VM reaped");
        Ok(())
    }

    /// [`HostSweeper::reap`] for a VM whose record is kept ([`Ladder::maintenance`]): its
    /// disk, VARS and seed stay.
    async fn halt(&self, kept: &Owned) -> Result<(), BackendError> {
        let id = &kept.instance_id;
        let how = self.stop_found(id, &Ladder::maintenance(self.powerdown_grace)).await?;
        self.release_gpus(id).await?;
        tracing::info!(%id, stopped = ?how, "VM stopped; its disk is kept");
        Ok(())
    }

    async fn tear_down(&self, instance: &Instance) -> Result<(), BackendError> {
        self.stop_found(&instance.id, &Ladder::graceful(self.powerdown_grace)).await?;
        self.remove(&instance.id).await
    }
}
