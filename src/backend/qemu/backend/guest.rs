//! Reaching the guest over SSH with the management key, and its renter keys.

use tokio::time::Instant;

use super::QemuBackend;
use crate::backend::BackendError;
use crate::guest::{GuestClient, GuestPaths, GuestTarget, setup};
use crate::instance::model::Instance;

impl QemuBackend {
    pub(super) async fn client(
        &self,
        instance: &Instance,
        deadline: Instant,
    ) -> Result<GuestClient, BackendError> {
        let target = self.target(instance)?;
        GuestClient::wait_reachable(&target, &self.key, deadline)
            .await
            .map_err(|e| BackendError::op("reach the guest over SSH", e))
    }

    pub(super) fn target(&self, instance: &Instance) -> Result<GuestTarget, BackendError> {
        let port = instance.management_port.ok_or_else(|| {
            BackendError::op("reach the guest", "the instance record has no management port")
        })?;
        Ok(GuestTarget::new(instance.id.clone(), port, self.paths(&instance.id).known_hosts))
    }

    pub(super) async fn apply_keys(
        &self,
        client: &GuestClient,
        instance: &Instance,
    ) -> Result<(), BackendError> {
        setup::set_authorized_keys(
            client,
            &GuestPaths::default(),
            Some(&self.key.public_line()),
            &instance.ssh_keys,
        )
        .await
        .map_err(|e| BackendError::op("apply SSH keys", e))
    }
}
