//! Stopping a VM's QEMU, however the agent knows it: the VM it watches, or a QEMU found by
//! its command line (one it could not adopt, or an orphan). Either way one
//! [`VmProcess::stop`] along the caller's [`Ladder`], done only once QEMU's last thread is
//! gone, so its GPUs can be let go.

use super::QemuBackend;
use crate::backend::BackendError;
use crate::backend::qemu::vm_process::{Ladder, Stopped};

impl QemuBackend {
    /// Stops instance `id`'s QEMU along `ladder`. Idempotent: nothing running is fine.
    pub(super) async fn stop_vm(&self, id: &str, ladder: Ladder) -> Result<Stopped, BackendError> {
        self.end_session(id).await;
        let vm = self.vms.lock().expect("vms lock").remove(id);
        match vm {
            Some(vm) => {
                vm.expect_exit();
                vm.process.stop(&ladder).await.map_err(|e| BackendError::op("stop QEMU", e))
            }
            None => self.sweeper.stop_found(id, &ladder).await,
        }
    }
}
