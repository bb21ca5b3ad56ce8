//! Taking the records back at start-up, one decision per record (the decisions come from
//! `crate::recovery`, which applies PROTOCOL.md §4; this file only carries them out).

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::flows::Flow;
use super::{Manager, ManagerError, Slot};
use crate::backend::Adoption;
use crate::instance::model::{Instance, Status};

/// What to do with one recorded instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restore {
    /// Its process is alive: reattach, then settle (pending, rebooting) or reconfigure.
    Adopt,
    /// Its process is gone: `error` with this reason until deleted or started again.
    Gone { reason: String },
    /// A create was cut short: what it made is removed now; `error` with this reason.
    RollBack { reason: String },
    /// Its process is gone and the lease goes on: boot it from its disk.
    Reboot,
    /// The lease is over, or a deletion was interrupted: tear down and forget.
    TearDown,
    /// Nothing to do (already in `error`).
    Keep,
}

impl Manager {
    /// Every stored record (recovery's input), straight from disk.
    pub fn stored_records(&self) -> Result<Vec<Instance>, ManagerError> {
        Ok(self.inner.store.load_all()?)
    }

    /// Takes the records back, each with its decision. Called once at start-up, before the
    /// API serves. Slow work (waiting for a guest, a teardown) continues in the background.
    pub async fn restore_with(&self, plan: Vec<(Instance, Restore)>) {
        for (instance, action) in plan {
            let id = instance.id.clone();
            let slot = Arc::new(Slot {
                record: Mutex::new(instance),
                op: Arc::default(),
                cancel: watch::channel(false).0,
            });
            self.slots().insert(id, Arc::clone(&slot));
            self.restore_one(slot, action).await;
        }
    }

    /// A later decision about an instance restored at start-up (the lease from `/init`):
    /// only `TearDown` and `Reboot` act; an id that is gone meanwhile is skipped.
    pub fn apply_lease(&self, id: &str, action: Restore) {
        let Some(slot) = self.slots().get(id).cloned() else { return };
        let current = slot.snapshot();
        match action {
            Restore::TearDown if !current.deleting => {
                tracing::info!(%id, "the lease is over: tearing the instance down");
                self.tear_down(slot);
            }
            Restore::Reboot if current.status == Status::Error && !current.deleting => {
                tracing::info!(%id, "the lease goes on: booting the instance from its disk");
                if self.set_status(&slot, Status::Pending, None).is_ok() {
                    self.spawn_flow(slot, Flow::Boot);
                }
            }
            _ => {}
        }
    }

    fn tear_down(&self, slot: Arc<Slot>) {
        if self.update(&slot, |i| i.deleting = true).is_err() {
            tracing::error!(id = %slot.snapshot().id, "cannot mark the instance for deletion");
        }
        slot.cancel.send_replace(true);
        self.spawn_flow(slot, Flow::Delete);
    }

    async fn restore_one(&self, slot: Arc<Slot>, action: Restore) {
        let instance = slot.snapshot();
        let id = instance.id.clone();
        // The backend of the record's own kind (the agent may run another kind now); a
        // teardown finds its own in the delete flow.
        let backend = match self.backend_of(&instance) {
            Ok(b) => b,
            Err(_) if action == Restore::TearDown => return self.tear_down(slot),
            Err(e) if action != Restore::Keep => {
                let _ = self.set_status(&slot, Status::Error, Some(e.to_string()));
                return;
            }
            Err(_) => return,
        };
        let fail = |reason: String| {
            if let Err(e) = self.set_status(&slot, Status::Error, Some(reason)) {
                tracing::error!(%id, error = %e, "cannot record the instance's state");
            }
        };
        match action {
            Restore::Keep => {}
            Restore::TearDown => self.tear_down(slot),
            Restore::Gone { reason } => {
                tracing::warn!(%id, %reason, "instance gone");
                fail(reason);
            }
            Restore::RollBack { reason } => {
                tracing::warn!(%id, %reason, "rolling back an interrupted create");
                if let Err(e) = backend.destroy(&instance).await {
                    tracing::error!(%id, error = %e, "rollback of an interrupted create is incomplete");
                }
                fail(reason);
            }
            Restore::Reboot => {
                if self.set_status(&slot, Status::Pending, None).is_ok() {
                    self.spawn_flow(slot, Flow::Boot);
                }
            }
            Restore::Adopt => match backend.adopt(&instance).await {
                Ok(Adoption::Adopted) => {
                    tracing::info!(%id, status = %instance.status, "instance adopted");
                    match instance.status {
                        Status::Pending | Status::Rebooting => self.spawn_flow(slot, Flow::Settle),
                        Status::Running => self.spawn_flow(slot, Flow::Reconfigure),
                        _ => {}
                    }
                }
                Ok(Adoption::Gone { detail }) => {
                    fail(format!("the VM exited while the agent was down ({detail})"))
                }
                Err(e) => {
                    tracing::warn!(%id, error = %e, "instance could not be adopted");
                    fail(e.to_string());
                }
            },
        }
    }
}
