//! Taking the records back at start-up, one decision per record (the decisions come from
//! `crate::recovery`, which applies PROTOCOL.md §4; this file only carries them out).

use std::sync::Arc;

use super::{Manager, ManagerError, Slot};
use crate::backend::{Adoption, Lifecycle};
use crate::instance::model::Instance;
use crate::instance::transition::Event;

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
            let slot = Arc::new(Slot::new(instance));
            self.slots().insert(id, Arc::clone(&slot));
            self.restore_one(slot, action).await;
        }
    }

    /// A later decision about an instance restored at start-up (the lease from `/init`):
    /// only `TearDown` and `Reboot` act; an id that is gone meanwhile is skipped.
    pub async fn apply_lease(&self, id: &str, action: Restore) {
        let Some(slot) = self.slots().get(id).cloned() else { return };
        match action {
            Restore::TearDown => {
                tracing::info!(%id, "the lease is over: tearing the instance down");
                self.tear_down(slot).await;
            }
            Restore::Reboot => self.run_event(slot, Event::Reboot).await,
            _ => {}
        }
    }

    async fn tear_down(&self, slot: Arc<Slot>) {
        if let Err(e) = self.begin_delete(Arc::clone(&slot)).await {
            tracing::error!(id = %slot.snapshot().id, error = %e, "cannot tear the instance down");
        }
    }

    /// Applies `event` and starts the flow it names.
    async fn run_event(&self, slot: Arc<Slot>, event: Event) {
        match self.apply(&slot, &event).await {
            Ok(Some(flow)) => self.spawn_flow(slot, flow),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(id = %slot.snapshot().id, ?event, error = %e, "cannot record the instance's state")
            }
        }
    }

    async fn restore_one(&self, slot: Arc<Slot>, action: Restore) {
        let instance = slot.snapshot();
        let id = instance.id.clone();
        let fail = |reason: String| self.run_event(Arc::clone(&slot), Event::Failed(reason));
        match action {
            Restore::Keep => {}
            Restore::TearDown => self.tear_down(slot).await,
            Restore::Gone { reason } => {
                tracing::warn!(%id, %reason, "instance gone");
                fail(reason).await;
            }
            Restore::RollBack { reason } => {
                tracing::warn!(%id, %reason, "rolling back an interrupted create");
                if let Err(e) = self.tear_down_instance(&instance).await {
                    tracing::error!(%id, error = %e, "rollback of an interrupted create is incomplete");
                }
                fail(reason).await;
            }
            Restore::Reboot => {
                // Its process is gone (an error, whatever the record said), and the lease
                // goes on: boot it from its disk, if the running backend is of its kind.
                if let Err(e) = self.lifecycle_of(&instance) {
                    return fail(e.to_string()).await;
                }
                fail("the VM exited while the agent was down".into()).await;
                self.run_event(slot, Event::Reboot).await;
            }
            // Only the running backend can adopt: a live instance of another kind is left
            // alone, in error, until deleted (its sweeper tears it down then).
            Restore::Adopt => match self.lifecycle_of(&instance) {
                Err(e) => fail(e.to_string()).await,
                Ok(backend) => self.adopt(slot, &instance, backend.as_ref()).await,
            },
        }
    }

    async fn adopt(&self, slot: Arc<Slot>, instance: &Instance, backend: &dyn Lifecycle) {
        let id = &instance.id;
        let fail = |reason: String| self.run_event(Arc::clone(&slot), Event::Failed(reason));
        match backend.adopt(instance).await {
            Ok(Adoption::Adopted) => {
                tracing::info!(%id, status = %instance.status, "instance adopted");
                self.run_event(slot, Event::Adopted).await;
            }
            Ok(Adoption::Gone { detail }) => {
                fail(format!("the VM exited while the agent was down ({detail})")).await
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "instance could not be adopted");
                fail(e.to_string()).await;
            }
        }
    }
}
