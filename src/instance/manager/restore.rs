//! Taking the records back at start-up, one decision per record (the decisions come from
//! `crate::recovery`, which applies PROTOCOL.md §4; this file only carries them out).

use super::task::Command;
use super::{Manager, ManagerError};
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

    /// Takes the records back, each with its decision, each by a task of its own. Called once
    /// at start-up, before the API serves: returns once every decision is recorded (an
    /// adoption made, a rollback done); slow work (waiting for a guest, a teardown) goes on
    /// in the background.
    pub async fn restore_with(&self, plan: Vec<(Instance, Restore)>) {
        let mut answers = Vec::new();
        for (instance, action) in plan {
            let background = action == Restore::TearDown;
            let task = self.spawn_task(instance);
            let (reply, answer) = tokio::sync::oneshot::channel();
            let reply = (!background).then_some(reply);
            let _ = task.commands.send(Command::Restore { action, reply }).await;
            answers.push(answer);
        }
        for answer in answers {
            let _ = answer.await;
        }
    }

    /// `recover`'s side of the records, with the agent stopped: the same tasks as at
    /// start-up carry out each decision (adoption and boots are the agent's, so those
    /// records are kept as they are), and each outcome comes back, teardowns included.
    pub async fn restore_offline(
        &self,
        plan: Vec<(Instance, Restore)>,
    ) -> Vec<(String, Result<(), ManagerError>)> {
        let mut answers = Vec::new();
        for (instance, action) in plan {
            let action = match action {
                Restore::Adopt | Restore::Reboot => Restore::Keep,
                other => other,
            };
            let id = instance.id.clone();
            let task = self.spawn_task(instance);
            let asked = async move {
                task.ask(|reply| Command::Restore { action, reply: Some(reply) }).await
            };
            answers.push((id, asked));
        }
        let mut outcomes = Vec::new();
        for (id, asked) in answers {
            outcomes.push((id, asked.await));
        }
        outcomes
    }

    /// A later decision about an instance restored at start-up (the lease from `/init`):
    /// only `TearDown` and `Reboot` act; an id that is gone meanwhile is skipped.
    pub async fn apply_lease(&self, id: &str, action: Restore) {
        let Some(task) = self.task(id) else { return };
        let command = match action {
            Restore::TearDown => {
                tracing::info!(%id, "the lease is over: tearing the instance down");
                Command::Restore { action, reply: None }
            }
            Restore::Reboot => Command::Lease(Event::Reboot),
            _ => return,
        };
        let _ = task.commands.send(command).await;
    }
}
