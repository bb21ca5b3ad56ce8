//! Public reachability of instance ports (PROTOCOL.md §3), behind a trait so that the manager
//! does not depend on FRP: the tunnel layer implements `Publisher`, and the agent hands one to
//! the manager once frpc runs, which is after registration (long after the manager exists).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use super::task::Command;
use super::{Manager, ManagerError};
use crate::instance::model::Instance;
use crate::instance::spec::SpecError;

/// Publishing failed as a whole (the tunnel layer's error, source kept).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PublishError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

/// Publishes an instance's ports (guest port → host port on 127.0.0.1 → public remote port).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Checks the values that would reach the tunnel's config (subdomain, proxy names, remote
    /// ports) before anything is created; a refusal is a 400.
    fn validate(&self, instance: &Instance) -> Result<(), SpecError>;
    /// Publishes (or publishes again) every port of `instance`. Ok: guest port → why that port
    /// is not public (empty when all are); Err: nothing could be published, and why.
    async fn publish(&self, instance: &Instance) -> Result<BTreeMap<u16, String>, PublishError>;
    /// Withdraws every port of an instance. Idempotent.
    async fn unpublish(&self, instance_id: &str) -> Result<(), PublishError>;
    /// Guest port → why it is not public now.
    async fn errors(&self, instance_id: &str) -> BTreeMap<u16, String>;
    /// Ids of the instances that have something published (recovery: orphans are withdrawn).
    fn published_ids(&self) -> Vec<String>;
}

/// The publisher, once there is one, and the last known per-port errors of each instance.
#[derive(Default)]
pub(super) struct PublishState {
    publisher: RwLock<Option<Arc<dyn Publisher>>>,
    errors: Mutex<BTreeMap<String, BTreeMap<u16, String>>>,
}

/// How long `GET /instances` waits for the tunnel's live view before showing the last known.
const LIVE_ERRORS_WAIT: Duration = Duration::from_secs(1);

impl Manager {
    /// Hands the manager its publisher (again after new FRP credentials): every instance is
    /// published by its task (after the operation in progress), and whatever is published
    /// for an id that has no live record is withdrawn.
    pub fn set_publisher(&self, publisher: Arc<dyn Publisher>) {
        *self.inner.publish.publisher.write().expect("publisher lock") = Some(publisher.clone());
        let tasks: Vec<_> = self.tasks().values().cloned().collect();
        let live: BTreeSet<String> =
            tasks.iter().map(|t| t.snapshot()).filter(|i| !i.deleting).map(|i| i.id).collect();
        for id in publisher.published_ids().into_iter().filter(|id| !live.contains(id)) {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                match publisher.unpublish(&id).await {
                    Ok(()) => {
                        tracing::info!(%id, "withdrew the tunnels of an instance with no record")
                    }
                    Err(e) => tracing::warn!(%id, error = %e, "cannot withdraw orphan tunnels"),
                }
            });
        }
        for task in tasks {
            tokio::spawn(async move {
                let _ = task.commands.send(Command::Publish).await;
            });
        }
    }

    fn publisher(&self) -> Option<Arc<dyn Publisher>> {
        self.inner.publish.publisher.read().expect("publisher lock").clone()
    }

    /// Create-time check of the tunnel values (no publisher: nothing to check yet).
    pub(super) fn validate_tunnels(&self, instance: &Instance) -> Result<(), ManagerError> {
        match self.publisher() {
            Some(p) => p.validate(instance).map_err(ManagerError::Invalid),
            None => Ok(()),
        }
    }

    /// Publishes the instance's ports; a failure is logged and shown per port in the status,
    /// never a reason to fail the instance. Only the instance's task calls it.
    pub(super) async fn publish_ports(&self, instance: &Instance) {
        let Some(publisher) = self.publisher() else { return };
        let id = instance.id.clone();
        let errors = match publisher.publish(instance).await {
            Ok(errors) => errors,
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot publish the instance's ports");
                instance.ports.iter().map(|p| (p.guest_port, e.to_string())).collect()
            }
        };
        for (port, error) in &errors {
            tracing::warn!(%id, port, %error, "port not published");
        }
        if errors.is_empty() {
            tracing::info!(%id, ports = instance.ports.len(), "instance ports published");
        }
        self.inner.publish.errors.lock().expect("errors lock").insert(id, errors);
    }

    /// Withdraws the instance's ports (part of teardown); a failure is only logged, since
    /// start-up withdraws whatever has no record.
    pub(super) async fn unpublish_ports(&self, id: &str) {
        self.inner.publish.errors.lock().expect("errors lock").remove(id);
        let Some(publisher) = self.publisher() else { return };
        if let Err(e) = publisher.unpublish(id).await {
            tracing::warn!(%id, error = %e, "cannot withdraw the instance's ports");
        }
    }

    /// Guest port → error, as last known, for the status view; None when every port is up.
    pub(super) fn port_errors(&self, id: &str) -> Option<BTreeMap<String, String>> {
        let errors = self.inner.publish.errors.lock().expect("errors lock");
        let errors = errors.get(id).filter(|e| !e.is_empty())?;
        Some(errors.iter().map(|(port, e)| (port.to_string(), e.clone())).collect())
    }

    /// `GET /instances`: the status with the tunnel's live per-port errors (the last known
    /// ones when the tunnel does not answer at once, e.g. during a publish).
    pub async fn status_live(&self) -> super::StatusView {
        if let (Some(publisher), Some(task)) = (self.publisher(), self.current()) {
            let id = task.snapshot().id;
            if let Ok(errors) = tokio::time::timeout(LIVE_ERRORS_WAIT, publisher.errors(&id)).await
            {
                self.inner.publish.errors.lock().expect("errors lock").insert(id, errors);
            }
        }
        self.status()
    }
}
