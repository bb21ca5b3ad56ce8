//! From `cont` to SSH: the guest either answers, or the agent says within seconds why it
//! cannot (QEMU's run state and exit, the serial console), and a KVM failure under `auto`
//! boots the VM again under TCG.

use std::time::Duration;

use tokio::time::Instant;

use super::{QemuBackend, QemuMachine};
use crate::backend::BackendError;
use crate::backend::qemu::accel::{Accel, Accelerator};
use crate::backend::qemu::console::ConsoleFollower;
use crate::backend::qemu::disk;
use crate::backend::qemu::vm::{ExitCause, Vm, VmExit};
use crate::backend::qemu::vm_process::Ladder;
use crate::guest::GuestError;
use crate::instance::model::Instance;

/// Boot-to-SSH allowance: software emulation is an order of magnitude slower than KVM.
pub const BOOT_DEADLINE_KVM: Duration = Duration::from_secs(180);
pub const BOOT_DEADLINE_TCG: Duration = Duration::from_secs(420);

/// Console lines quoted when the guest never answered.
const CONSOLE_LINES: usize = 3;

/// Ends the watch of a boot however the wait ends (also when the caller gives up on it).
struct Unwatch<'a>(&'a Vm);

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        let _ = self.0.set_booting(false);
    }
}

/// How one boot ended when it did not reach SSH.
enum BootEnd {
    Failed(BackendError),
    /// KVM could not run the guest: QEMU's words.
    Kvm {
        detail: String,
        exit: VmExit,
    },
}

/// After KVM failed a VM's boot: `Ok` to boot it again under TCG (`auto`, no GPUs: KVM is
/// then marked unusable for this boot of the host), else the error for the instance.
fn after_kvm_failure(
    accel: &Accelerator,
    has_gpus: bool,
    detail: &str,
    exit: &VmExit,
) -> Result<(), BackendError> {
    if has_gpus {
        // TCG cannot pass a device through: such a VM is never moved silently.
        accel.kvm_failed(detail);
        let detail = format!(
            "{}; KVM is broken on this host and a VM with GPUs cannot run without it: fix KVM \
             (see `qudata-agent doctor`), then reboot the host",
            exit.reason
        );
        return Err(BackendError::BootFailed { detail });
    }
    if !accel.kvm_failed(detail) {
        let detail = format!(
            "{}; QUDATA_QEMU_ACCEL=kvm never falls back: fix KVM or set it to auto",
            exit.reason
        );
        return Err(BackendError::BootFailed { detail });
    }
    Ok(())
}

/// Why a guest that booted never answered, from what its console showed last.
fn never_answered(shown: &str) -> String {
    let console = if shown.is_empty() {
        "its console stayed empty (the firmware or the image prints nothing on the serial port)"
            .to_owned()
    } else {
        format!("its console last showed: {shown}")
    };
    format!(
        "it never answered SSH; {console}; the image must start an SSH server that takes the \
         NoCloud seed's key"
    )
}

impl QemuBackend {
    /// How long a guest may take from power-on to SSH under the current accelerator.
    pub(super) fn boot_deadline(&self) -> Duration {
        self.settings.boot_deadline.unwrap_or(match self.settings.accel.current() {
            Accel::Kvm => BOOT_DEADLINE_KVM,
            Accel::Tcg => BOOT_DEADLINE_TCG,
        })
    }
}

impl QemuMachine {
    /// Waits for the guest's SSH; a KVM failure under `auto` boots it once more under TCG. A
    /// boot that fails leaves no QEMU behind (stopped at once: a guest that never came up has
    /// nobody to act on the power button), so `start` can boot it again.
    pub(super) async fn wait_booted(&self, instance: &Instance) -> Result<(), BackendError> {
        // A boot starts from nothing: a connection of an earlier boot (a reset, a QEMU that
        // went) may still look open but leads nowhere.
        self.end_session().await;
        let result = self.boot_with_fallback(instance).await;
        if result.is_err()
            && let Err(e) = self.stop_along(&Ladder::abort()).await
        {
            tracing::error!(id = %instance.id, error = %e, "cannot stop QEMU");
        }
        result
    }

    async fn boot_with_fallback(&self, instance: &Instance) -> Result<(), BackendError> {
        let (detail, exit) = match self.watch_boot(instance).await {
            Ok(()) => return Ok(()),
            Err(BootEnd::Failed(e)) => return Err(e),
            Err(BootEnd::Kvm { detail, exit }) => (detail, exit),
        };
        let backend = &self.backend;
        after_kvm_failure(&backend.settings.accel, !instance.gpus.is_empty(), &detail, &exit)?;
        tracing::warn!(id = %instance.id, %detail, "booting the VM again under TCG");
        let paths = backend.paths(&instance.id);
        // The firmware may have written its variables before it died.
        disk::copy_vars(&backend.settings.ovmf.vars_template, &paths.vars)
            .map_err(|e| BackendError::op("create the firmware variables", e))?;
        self.end_session().await;
        self.replace_vm(backend.start(instance, &paths).await?);
        match self.watch_boot(instance).await {
            Ok(()) => Ok(()),
            Err(BootEnd::Failed(e)) => Err(e),
            Err(BootEnd::Kvm { exit, .. }) => Err(BackendError::BootFailed { detail: exit.reason }),
        }
    }

    /// One boot: SSH answers, QEMU stops the VM or exits, the console shows a failure, or
    /// the deadline passes.
    async fn watch_boot(&self, instance: &Instance) -> Result<(), BootEnd> {
        let vm = self.running("wait for the guest").map_err(BootEnd::Failed)?;
        let paths = self.backend.paths(&instance.id);
        let limit = self.backend.boot_deadline();
        let session = self.session(instance).map_err(BootEnd::Failed)?;
        let console = ConsoleFollower::new(&paths.serial_log, vm.boot_offset());
        vm.set_booting(true);
        let watched = Unwatch(&vm);
        tokio::select! {
            // The connection is kept: configuration and GPU metrics use it next.
            client = session.connect_until(Instant::now() + limit) => {
                match client {
                    Ok(_) => {
                        drop(watched);
                        if vm.set_booting(false) {
                            // Gone right after answering: the exit was kept from the manager.
                            let detail = vm.exited().await.reason;
                            return Err(BootEnd::Failed(BackendError::BootFailed { detail }));
                        }
                        Ok(())
                    }
                    // Up, but the agent cannot tell it is this VM: the renter's VM keeps
                    // running, the agent stays out (said once, here and by `configure`).
                    Err(e @ GuestError::HostKeyChanged { .. }) => {
                        drop(watched);
                        tracing::warn!(id = %instance.id, error = %e, "the guest is up, but the agent cannot verify its SSH host key");
                        if vm.set_booting(false) {
                            let detail = vm.exited().await.reason;
                            return Err(BootEnd::Failed(BackendError::BootFailed { detail }));
                        }
                        Ok(())
                    }
                    Err(GuestError::Unreachable { last, .. }) => {
                        tracing::warn!(id = %instance.id, error = %last, "the guest never answered SSH");
                        let seconds = limit.as_secs();
                        let detail = never_answered(&console.last_lines(CONSOLE_LINES));
                        Err(BootEnd::Failed(BackendError::NotReachable { seconds, detail }))
                    }
                    Err(e) => Err(BootEnd::Failed(BackendError::op("reach the guest over SSH", e))),
                }
            }
            exit = vm.exited() => Err(match exit.cause {
                ExitCause::Kvm { ref detail } => BootEnd::Kvm { detail: detail.clone(), exit },
                _ => BootEnd::Failed(BackendError::BootFailed { detail: exit.reason }),
            }),
            failure = console.failure() => {
                tracing::warn!(id = %instance.id, %failure, "the guest cannot boot");
                Err(BootEnd::Failed(BackendError::BootFailed { detail: failure.to_string() }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::backend::qemu::accel::Decision;
    use crate::backend::qemu::disk::Ovmf;
    use crate::config::AccelChoice;

    fn kvm(choice: AccelChoice, run_dir: &Path) -> Accelerator {
        let decision = Decision { accel: Accel::Kvm, reason: "probe ran".into() };
        let ovmf = Ovmf { code: "/fw/CODE.fd".into(), vars_template: "/fw/VARS.fd".into() };
        Accelerator::new(choice, decision, Path::new("qemu"), &ovmf, run_dir)
    }

    #[test]
    fn only_auto_without_gpus_boots_again_under_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let detail = "KVM internal error (emulation failure)";
        let exit = VmExit {
            cause: ExitCause::Kvm { detail: detail.into() },
            reason: format!("QEMU stopped the VM: {detail}"),
        };
        let auto = kvm(AccelChoice::Auto, dir.path());
        assert_eq!(after_kvm_failure(&auto, false, detail, &exit), Ok(()));
        assert_eq!(auto.current(), Accel::Tcg);

        let with_gpus = kvm(AccelChoice::Auto, dir.path());
        let err = after_kvm_failure(&with_gpus, true, detail, &exit).unwrap_err().to_string();
        assert_eq!(
            err,
            "the VM did not boot: QEMU stopped the VM: KVM internal error (emulation failure); \
             KVM is broken on this host and a VM with GPUs cannot run without it: fix KVM (see \
             `qudata-agent doctor`), then reboot the host"
        );
        assert_eq!(with_gpus.current(), Accel::Tcg, "later VMs without GPUs still use TCG");

        let forced = kvm(AccelChoice::Kvm, dir.path());
        let err = after_kvm_failure(&forced, false, detail, &exit).unwrap_err().to_string();
        assert!(err.ends_with("QUDATA_QEMU_ACCEL=kvm never falls back: fix KVM or set it to auto"));
        assert_eq!(forced.current(), Accel::Kvm);
    }
}
