//! The guest's one SSH session (readiness, configuration, renter keys, GPU metrics all use
//! it), made on first use and closed when the VM stops or boots again.

use std::sync::Arc;

use tokio::time::Instant;

use super::QemuMachine;
use crate::backend::BackendError;
use crate::guest::{GuestClient, GuestError, GuestPaths, GuestSession, GuestTarget, setup};
use crate::instance::model::Instance;

impl QemuMachine {
    /// The instance's session, made (not yet connected) on first use.
    pub(super) fn session(&self, instance: &Instance) -> Result<Arc<GuestSession>, BackendError> {
        let mut held = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(session) = held.as_ref() {
            return Ok(session.clone());
        }
        let session = Arc::new(GuestSession::new(self.target(instance)?, self.backend.key.clone()));
        *held = Some(session.clone());
        Ok(session)
    }

    /// Stops the GPU metrics channel and closes the session: the VM stops, or boots again
    /// and nothing of the last boot's connection is any use.
    pub(super) async fn end_session(&self) {
        if let Some(gpu) = &self.backend.gpu {
            gpu.streams.stop(&self.id).await;
        }
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(session) = session {
            session.close().await;
        }
    }

    /// The session's live connection, or a new one before `deadline`.
    pub(super) async fn client(
        &self,
        instance: &Instance,
        deadline: Instant,
    ) -> Result<Arc<GuestClient>, BackendError> {
        let session = self.session(instance)?;
        let started = Instant::now();
        let timeout = || GuestError::Timeout {
            instance: instance.id.clone(),
            action: "reconnecting over SSH",
            after: deadline.saturating_duration_since(started),
        };
        tokio::time::timeout_at(deadline, session.get())
            .await
            .map_err(|_| timeout())
            .and_then(|got| got)
            .map_err(|e| BackendError::op("reach the guest over SSH", e))
    }

    pub(super) fn target(&self, instance: &Instance) -> Result<GuestTarget, BackendError> {
        let paths = self.backend.paths(&instance.id);
        // On the bridge, the guest's own sshd; a VM recorded before the bridge, through its
        // user-network forward on 127.0.0.1.
        let mut target = if let Some(guest) = &instance.network {
            let mut target = GuestTarget::new(instance.id.clone(), 22, paths.known_hosts);
            target.addr = std::net::SocketAddr::from((guest.address, 22));
            target
        } else {
            let port = instance.management_port.ok_or_else(|| {
                BackendError::op(
                    "reach the guest",
                    "the instance record has no address or management port",
                )
            })?;
            GuestTarget::new(instance.id.clone(), port, paths.known_hosts)
        };
        // Host keys are learned from the VM's own console (see `guest::hostkey`).
        target.host_keys.console = Some(paths.serial_log);
        Ok(target)
    }

    pub(super) async fn apply_keys(
        &self,
        client: &GuestClient,
        instance: &Instance,
    ) -> Result<(), BackendError> {
        setup::set_authorized_keys(
            client,
            &GuestPaths::default(),
            Some(&self.backend.key.public_line()),
            &instance.ssh_keys,
        )
        .await
        .map_err(|e| BackendError::op("apply SSH keys", e))
    }
}
