//! What a backend reports on its own: an instance that exited, or came back, without being
//! asked.

use tokio::sync::mpsc;

use super::Manager;
use crate::backend::BackendEvent;
use crate::instance::transition::Event;

impl Manager {
    /// Listens to backend events (VM crashed, guest powered off) until the sender closes.
    pub fn spawn_event_loop(&self, mut events: mpsc::UnboundedReceiver<BackendEvent>) {
        let manager = self.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                manager.on_event(event).await;
            }
        });
    }

    async fn on_event(&self, event: BackendEvent) {
        let (id, event) = match event {
            BackendEvent::Exited { id, reason } => (id, Event::Failed(reason)),
            BackendEvent::Started { id } => (id, Event::StartedAgain),
        };
        let Some(slot) = self.slots().get(&id).cloned() else { return };
        let before = slot.snapshot();
        match self.apply(&slot, &event).await {
            Ok(flow) => {
                let after = slot.snapshot();
                if after.status != before.status {
                    tracing::warn!(%id, ?event, status = %after.status, "the instance changed on its own");
                }
                // Running again on its own: configure it again (keys, SSH server). A flow in
                // progress (boot, reset) configures it anyway.
                if let Some(flow) = flow {
                    tracing::info!(%id, "instance started again on its own; configuring it");
                    self.spawn_flow(slot, flow);
                }
            }
            Err(e) => tracing::error!(%id, error = %e, "cannot record what the backend saw"),
        }
    }
}
