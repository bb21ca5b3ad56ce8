//! `QemuMachine`: one live VM as its instance's task holds it: the QEMU (its process, monitor
//! and watcher, as a [`Vm`]) and the guest's one SSH session.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::QemuBackend;
use crate::backend::qemu::vm::Vm;
use crate::backend::qemu::vm_process::Ladder;
use crate::backend::{BackendError, Machine};
use crate::guest::metrics::StreamSpec;
use crate::guest::{GuestError, GuestPaths, GuestSession, setup};
use crate::instance::model::Instance;
use crate::network::forward::Forwards;

pub struct QemuMachine {
    pub(super) backend: QemuBackend,
    pub(super) id: String,
    /// The VM's QEMU; replaced only when a boot that KVM failed is started again under TCG.
    /// (A std lock: held to read or swap the handle, never across a wait.)
    vm: Mutex<Arc<Vm>>,
    /// The guest's session, made on first use, closed when the VM stops or boots again
    /// (see `guest.rs`).
    pub(super) session: Mutex<Option<Arc<GuestSession>>>,
    /// `127.0.0.1:<host port>` → the guest; they close with the machine.
    forwards: Mutex<Option<Forwards>>,
}

impl QemuMachine {
    pub(super) fn new(
        backend: QemuBackend,
        vm: Arc<Vm>,
        forwards: Option<Forwards>,
    ) -> Arc<QemuMachine> {
        let id = vm.id.clone();
        Arc::new(QemuMachine {
            backend,
            id,
            vm: Mutex::new(vm),
            session: Mutex::default(),
            forwards: Mutex::new(forwards),
        })
    }

    pub(super) fn set_forwards(&self, forwards: Option<Forwards>) {
        *self.forwards.lock().unwrap_or_else(|e| e.into_inner()) = forwards;
    }

    pub(super) fn vm(&self) -> Arc<Vm> {
        Arc::clone(&self.vm.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn replace_vm(&self, vm: Arc<Vm>) {
        *self.vm.lock().unwrap_or_else(|e| e.into_inner()) = vm;
    }

    /// The VM when its QEMU still runs.
    pub(super) fn running(&self, operation: &'static str) -> Result<Arc<Vm>, BackendError> {
        let vm = self.vm();
        match vm.exit_reason() {
            None => Ok(vm),
            Some(reason) => Err(BackendError::Gone {
                detail: format!("cannot {operation}: the VM's QEMU is not running ({reason})"),
            }),
        }
    }

    /// Stops the VM's QEMU along `ladder`, returning once its last thread is gone (so its
    /// GPUs can be let go). Idempotent.
    pub(super) async fn stop_along(&self, ladder: &Ladder) -> Result<(), BackendError> {
        self.end_session().await;
        let vm = self.vm();
        vm.expect_exit();
        vm.process.stop(ladder).await.map(drop).map_err(|e| BackendError::op("stop QEMU", e))
    }

    /// (Re)starts the instance's GPU metrics stream, a channel on the guest's session; it
    /// ends by itself when QEMU exits.
    fn start_gpu_stream(&self, instance: &Instance) {
        let Some(gpu) = &self.backend.gpu else { return };
        let Ok(vm) = self.running("report GPU metrics") else { return };
        let Ok(session) = self.session(instance) else { return };
        let spec =
            StreamSpec { session, has_gpus: !instance.gpus.is_empty(), interval: gpu.interval };
        gpu.streams.start(spec, async move {
            vm.exited().await;
        });
    }
}

#[async_trait]
impl Machine for QemuMachine {
    async fn wait_ready(&self, instance: &Instance) -> Result<(), BackendError> {
        self.wait_booted(instance).await
    }

    async fn configure(&self, instance: &Instance) -> Result<(), BackendError> {
        let deadline = Instant::now() + self.backend.boot_deadline();
        let client = match self.client(instance, deadline).await {
            Ok(client) => client,
            // The guest runs and is the renter's; without a verified host key the agent does
            // not log in (keys and the service wait), which must not fail the instance.
            Err(e) if host_key_unverified(&e) => {
                tracing::warn!(id = %instance.id, error = %e, "the guest is not configured: its SSH host key cannot be verified");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.apply_keys(&client, instance).await?;
        if let Some((command, env)) = service_of(instance) {
            setup::start_service(&client, &GuestPaths::default(), &command, &env)
                .await
                .map_err(|e| BackendError::op("start the command", e))?;
        }
        self.start_gpu_stream(instance);
        Ok(())
    }

    async fn apply_ssh_keys(&self, instance: &Instance) -> Result<(), BackendError> {
        let client = match self.client(instance, Instant::now() + Duration::from_secs(30)).await {
            Ok(client) => client,
            // Not the agent's fault nor the request's: the guest's state (409, one sentence).
            Err(e) if host_key_unverified(&e) => {
                return Err(BackendError::Refused { reason: e.to_string() });
            }
            Err(e) => return Err(e),
        };
        self.apply_keys(&client, instance).await
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let vm = self.running("stop")?;
        vm.qmp.stop().await.map_err(|e| BackendError::op("stop", e))
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let vm = self.running("start")?;
        vm.qmp.cont().await.map_err(|e| BackendError::op("start", e))
    }

    async fn reset(&self) -> Result<(), BackendError> {
        let vm = self.running("restart")?;
        let was_paused = matches!(vm.qmp.query_status().await.map(|s| s.running), Ok(false));
        vm.mark_reboot(&self.backend.paths(&self.id));
        vm.qmp.system_reset().await.map_err(|e| BackendError::op("restart", e))?;
        if was_paused {
            vm.qmp.cont().await.map_err(|e| BackendError::op("restart", e))?;
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), BackendError> {
        self.stop_along(&Ladder::graceful(self.backend.settings.powerdown_grace)).await
    }

    async fn stop_now(&self) -> Result<(), BackendError> {
        self.stop_along(&Ladder::abort()).await
    }
}

/// What runs in the guest as the renter's service: the request's `command`, or the agent's
/// JupyterLab with its token when the request asked for port 8888 without one.
fn service_of(instance: &Instance) -> Option<(String, BTreeMap<String, String>)> {
    if let Some(command) = &instance.spec.command {
        return Some((command.clone(), instance.spec.env.clone()));
    }
    let token = instance.jupyter_token.as_ref()?;
    let mut env = instance.spec.env.clone();
    env.insert("JUPYTER_TOKEN".into(), token.expose().to_owned());
    Some((setup::JUPYTER_COMMAND.to_owned(), env))
}

/// Whether `e` is the guest offering an SSH host key its console never showed.
fn host_key_unverified(e: &BackendError) -> bool {
    // The source is held as `Arc<dyn Error>`, whose own `source()` skips the error itself.
    let BackendError::Operation { source, .. } = e else { return false };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**source);
    while let Some(err) = next {
        if let Some(GuestError::HostKeyChanged { .. }) = err.downcast_ref::<GuestError>() {
            return true;
        }
        next = err.source();
    }
    false
}
