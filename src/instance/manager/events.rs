//! What a backend reports on its own: an instance that exited, or came back, without being
//! asked.

use tokio::sync::mpsc;

use super::{Manager, flows};
use crate::backend::BackendEvent;
use crate::instance::model::Status;

impl Manager {
    /// Listens to backend events (VM crashed, guest powered off) until the sender closes.
    pub fn spawn_event_loop(&self, mut events: mpsc::UnboundedReceiver<BackendEvent>) {
        let manager = self.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                manager.on_event(event);
            }
        });
    }

    fn on_event(&self, event: BackendEvent) {
        let (id, reason) = match event {
            BackendEvent::Exited { id, reason } => (id, reason),
            BackendEvent::Started { id } => return self.on_started(&id),
        };
        let Some(slot) = self.slots().get(&id).cloned() else { return };
        let current = slot.snapshot();
        if current.deleting || current.status == Status::Error {
            return;
        }
        tracing::warn!(%id, %reason, "instance exited on its own");
        if let Err(e) = self.set_status(&slot, Status::Error, Some(reason)) {
            tracing::error!(%id, error = %e, "cannot record the instance's exit");
        }
    }

    /// The instance runs again on its own: configure it again (keys, SSH server) and report
    /// it running. A flow in progress (boot, reset) configures it anyway.
    fn on_started(&self, id: &str) {
        let Some(slot) = self.slots().get(id).cloned() else { return };
        let current = slot.snapshot();
        let flow = match current.status {
            _ if current.deleting => return,
            Status::Error => flows::Flow::Settle,
            Status::Running => flows::Flow::Reconfigure,
            _ => return,
        };
        tracing::info!(%id, "instance started again on its own; configuring it");
        if flow == flows::Flow::Settle
            && let Err(e) = self.set_status(&slot, Status::Pending, None)
        {
            tracing::error!(%id, error = %e, "cannot record the restart");
            return;
        }
        self.spawn_flow(slot, flow);
    }
}
