//! What a backend reports on its own: an instance that exited, or came back, without being
//! asked. Each report goes to the instance's task as an event.

use tokio::sync::mpsc;

use super::Manager;
use super::task::Command;
use crate::backend::BackendEvent;
use crate::instance::transition::Event;

impl Manager {
    /// Routes backend events (VM crashed, guest powered off) until the sender closes.
    pub fn spawn_event_loop(&self, mut events: mpsc::UnboundedReceiver<BackendEvent>) {
        let manager = self.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let (id, event) = match event {
                    BackendEvent::Exited { id, reason } => (id, Event::Failed(reason)),
                    BackendEvent::Started { id } => (id, Event::StartedAgain),
                };
                // An instance forgotten meanwhile has nothing left to tell.
                if let Some(task) = manager.task(&id) {
                    let _ = task.commands.send(Command::Observed(event)).await;
                }
            }
        });
    }
}
