//! The QEMU backend's side of recovery: every VM of this agent found by its command line; an
//! orphan (no record claims it) stopped, its GPUs released and its files removed; a recorded
//! VM halted for host maintenance, its files kept.

use super::QemuBackend;
use crate::backend::qemu::gpus;
use crate::backend::qemu::vm_process::Ladder;
use crate::backend::{BackendError, Owned};

impl QemuBackend {
    /// Every live QEMU whose command line carries this agent's marker and pidfile path.
    pub(super) fn owned_vms(&self) -> Vec<Owned> {
        let found = self.settings.proc_root.scan(&self.settings.run_dir).into_iter();
        found
            .map(|f| Owned { what: format!("QEMU pid {}", f.pid), instance_id: f.instance_id })
            .collect()
    }

    /// Stops instance `id`'s orphan QEMU ([`Ladder::graceful`]), then returns its GPUs (only
    /// once QEMU is gone) and removes its layout files. Idempotent.
    pub(super) async fn reap_vm(&self, id: &str) -> Result<(), BackendError> {
        let how = self.stop_vm(id, Ladder::graceful(self.settings.powerdown_grace)).await?;
        gpus::release(&self.settings.vfio, id).await?;
        let removed = self
            .paths(id)
            .remove_known()
            .map_err(|e| BackendError::op("remove the orphan's files", e))?;
        tracing::info!(%id, stopped = ?how, files = removed.len(), "orphan VM reaped");
        Ok(())
    }

    /// [`QemuBackend::reap_vm`] for a VM whose record is kept ([`Ladder::maintenance`]): its
    /// disk, VARS and seed stay.
    pub(super) async fn halt_vm(&self, id: &str) -> Result<(), BackendError> {
        let how = self.stop_vm(id, Ladder::maintenance(self.settings.powerdown_grace)).await?;
        gpus::release(&self.settings.vfio, id).await?;
        tracing::info!(%id, stopped = ?how, "VM stopped; its disk is kept");
        Ok(())
    }
}
