//! Stopping a VM's QEMU: power button, then `quit`, then signals, and the GPUs let go only
//! once the process is really gone.

use std::time::Duration;

use tokio::time::Instant;

use super::{QUIT_GRACE, QemuBackend};
use crate::backend::BackendError;
use crate::backend::qemu::layout::VmPaths;
use crate::backend::qemu::process;
use crate::instance::model::Instance;

/// How long a QEMU that was told to go may take to be gone: unpinning the memory of a large
/// guest with passed-through devices takes many seconds.
const EXIT_DEADLINE: Duration = Duration::from_secs(120);

impl QemuBackend {
    /// Stops the VM: ACPI power-down (when `graceful`: a guest that never booted has nobody
    /// to press the button for), then `quit`, then signals, each with a deadline.
    pub(super) async fn stop_vm(
        &self,
        instance: &Instance,
        paths: &VmPaths,
        graceful: bool,
    ) -> Result<(), BackendError> {
        if let Some(gpu) = &self.gpu {
            gpu.streams.stop(&instance.id).await;
        }
        let vm = self.vms.lock().expect("vms lock").remove(&instance.id);
        let known_pid = vm.as_ref().map(|vm| vm.pid);
        let mut told_to_go = false;
        if let Some(vm) = vm.filter(|vm| vm.exit_reason().is_none()) {
            vm.expect_exit();
            let paused = matches!(vm.qmp.query_status().await.map(|s| s.running), Ok(false));
            // A paused guest cannot act on the power button.
            told_to_go = (graceful
                && !paused
                && vm.qmp.system_powerdown().await.is_ok()
                && vm.wait_exited(self.settings.powerdown_grace).await)
                || (vm.qmp.quit().await.is_ok() && vm.wait_exited(QUIT_GRACE).await);
        }
        if !told_to_go {
            // Adopted VMs we could not reach, or a QEMU that ignored `quit`.
            process::terminate(&paths.pidfile, &instance.id, QUIT_GRACE)
                .await
                .map_err(|e| BackendError::op("stop QEMU", e))?;
        }
        // "Exited" above means the monitor closed and at most a deadline passed; an exiting
        // QEMU has already removed its pidfile and shows an empty command line, yet it still
        // holds its VFIO devices while the kernel unpins guest memory. The GPUs are released
        // only once the process we knew is gone.
        if let Some(pid) = known_pid {
            let until = Instant::now() + EXIT_DEADLINE;
            while process::is_alive(pid) {
                if Instant::now() >= until {
                    return Err(BackendError::op(
                        "stop QEMU",
                        format!("QEMU pid {pid} did not exit within {EXIT_DEADLINE:?}"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}
