//! A task's side of recovery: the decision for a record taken back at start-up (or by
//! `recover`), and what adoption found.

use super::{InstanceTask, Reply, Work, answer};
use crate::backend::Adoption;
use crate::instance::manager::ops::Op;
use crate::instance::manager::{ManagerError, Restore};
use crate::instance::transition::{Conflict, Event, Flow};

impl InstanceTask {
    /// Carries out recovery's decision for this record (PROTOCOL.md §4, decided by
    /// `crate::recovery`).
    pub(super) async fn restore(&mut self, action: Restore, reply: Option<Reply>) {
        let id = self.id.clone();
        let result = match action {
            Restore::Keep => Ok(()),
            Restore::TearDown => {
                tracing::info!(%id, "tearing the instance down");
                // Answered when the teardown is done (or given up).
                return if let Err(e) = self.delete(None).await {
                    answer(reply, Err(e));
                } else {
                    self.attach_reply(reply);
                };
            }
            Restore::Gone { reason } => {
                tracing::warn!(%id, %reason, "instance gone");
                self.run_event(Event::Failed(reason)).await
            }
            Restore::RollBack { reason } => {
                tracing::warn!(%id, %reason, "rolling back an interrupted create");
                self.enqueue_op(Op::RollBack { reason }, reply);
                return;
            }
            Restore::Reboot => match self.manager.lifecycle_of(&self.snapshot()) {
                // Its process is gone (an error, whatever the record said), and the lease
                // goes on: boot it from its disk, if the running backend is of its kind.
                Err(e) => self.run_event(Event::Failed(e.to_string())).await,
                Ok(_) => {
                    let gone = Event::Failed("the VM exited while the agent was down".into());
                    match self.run_event(gone).await {
                        Ok(()) => self.run_event(Event::Reboot).await,
                        Err(e) => Err(e),
                    }
                }
            },
            // Only the running backend can adopt: a live instance of another kind is left
            // alone, in error, until deleted (its sweeper tears it down then).
            Restore::Adopt => match self.manager.lifecycle_of(&self.snapshot()) {
                Err(e) => self.run_event(Event::Failed(e.to_string())).await,
                Ok(_) => {
                    self.enqueue_op(Op::Adopt, reply);
                    return;
                }
            },
        };
        if let Err(e) = &result {
            tracing::error!(%id, error = %e, "cannot record the instance's state");
        }
        answer(reply, result);
    }

    /// Hands `reply` to the deletion that is queued or running.
    pub(super) fn attach_reply(&mut self, reply: Option<Reply>) {
        let Some(reply) = reply else { return };
        let deleting = |op: &Op| matches!(op, Op::Flow(Flow::Delete));
        if let Some(running) = self.running.as_mut().filter(|r| deleting(&r.op))
            && running.reply.is_none()
        {
            running.reply = Some(reply);
            return;
        }
        if let Some(queued) =
            self.queue.iter_mut().find(|q| matches!(q.work, Work::Flow(Flow::Delete)))
            && queued.reply.is_none()
        {
            queued.reply = Some(reply);
            return;
        }
        let _ = reply.send(Ok(()));
    }

    fn enqueue_op(&mut self, op: Op, reply: Option<Reply>) {
        match self.running {
            None => self.start(op, reply),
            Some(_) => {
                // Recovery's operation is the task's first: nothing else can run yet.
                let status = self.record.borrow().status;
                let reason = "another operation on the instance is in progress".into();
                answer(reply, Err(Conflict { status, reason }.into()));
            }
        }
    }

    /// What adoption found, recorded.
    pub(super) async fn adopted(&mut self, adoption: Adoption) -> Result<(), ManagerError> {
        let id = self.id.clone();
        match adoption {
            Adoption::Adopted(machine) => {
                tracing::info!(%id, status = %self.record.borrow().status, "instance adopted");
                self.machine = Some(machine);
                self.run_event(Event::Adopted).await
            }
            Adoption::Unsure { machine, error } => {
                tracing::warn!(%id, %error, "instance could not be checked; watching it");
                self.machine = Some(machine);
                self.run_event(Event::Failed(error.to_string())).await
            }
            Adoption::Gone { detail } => {
                let reason = format!("the VM exited while the agent was down ({detail})");
                self.run_event(Event::Failed(reason)).await
            }
        }
    }
}
