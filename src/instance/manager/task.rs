//! `InstanceTask`: the one owner of an instance (the `tunnel::Supervisor` pattern). It holds
//! the record (the only writer; readers get copies through a watch channel), the instance's
//! [`Machine`] (its process or container handle and guest connection) and the operation in
//! progress, and takes typed [`Command`]s over a channel.
//!
//! The task's loop never waits on a guest or a backend: slow work runs as one operation at
//! a time (an [`Op`], a future the loop polls beside its channel); a command that fits but
//! finds an operation running waits its turn in a queue, with a deadline when a caller waits
//! for the answer. Only the record's save (fsync, off the runtime's workers) is awaited in
//! the loop.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::ops::{self, Done, Op};
use super::{KeyChange, Manager, ManagerError, OP_WAIT, Restore};
use crate::backend::Machine;
use crate::instance::model::{Instance, Status};
use crate::instance::transition::{self, Conflict, Event, Flow};

mod keys;
mod restore;

/// Answers a caller that waits for a command's outcome.
pub(super) type Reply = oneshot::Sender<Result<(), ManagerError>>;

/// What an instance's task is told.
pub(super) enum Command {
    /// A new instance: build it.
    Create,
    /// `start`, `stop`, `restart`: answered once applied (pause and resume: once done).
    Lifecycle { event: Event, reply: Reply },
    /// Answered once the deletion is recorded; the teardown goes on in the background.
    Delete { reply: Reply },
    /// A renter key added or removed: answered once applied to a running guest.
    Keys { change: KeyChange, reply: Reply },
    /// What the backend saw the instance do on its own (exited, running again).
    Observed(Event),
    /// The lease's word on an instance restored at start-up (`Reboot`: boot it from its
    /// disk, if it is in error).
    Lease(Event),
    /// Recovery's decision for a record taken back; answered once its work is done.
    Restore { action: Restore, reply: Option<Reply> },
    /// Publish the instance's ports (again): a new publisher.
    Publish,
    /// The agent is about to exit: a deletion stops the VM or container at once.
    Hurry,
}

/// The commands-side view of a task: where to send, and the record as last saved.
#[derive(Clone)]
pub(super) struct TaskHandle {
    pub commands: mpsc::Sender<Command>,
    pub record: watch::Receiver<Instance>,
}

impl TaskHandle {
    pub fn snapshot(&self) -> Instance {
        self.record.borrow().clone()
    }

    /// Sends `command` and waits for its answer; a task that ended meanwhile (its instance
    /// deleted) answers "no instance".
    pub async fn ask(&self, command: impl FnOnce(Reply) -> Command) -> Result<(), ManagerError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| ManagerError::NotFound)?;
        answer.await.unwrap_or(Err(ManagerError::NotFound))
    }
}

/// Work that found an operation running and waits for its turn.
enum Work {
    /// A lifecycle command, decided again when its turn comes (the state may have moved).
    Command(Event),
    /// A flow an event started.
    Flow(Flow),
    /// Renter keys to apply to the running guest; the record goes back to `previous` if not.
    Keys {
        previous: Vec<String>,
    },
    Publish,
}

struct Queued {
    work: Work,
    /// When a waiting caller gets "another operation is in progress" instead.
    deadline: Option<Instant>,
    reply: Option<Reply>,
}

type OpFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The operation in progress.
struct Running {
    op: Op,
    future: OpFuture,
    reply: Option<Reply>,
}

pub(super) struct InstanceTask {
    manager: Manager,
    id: String,
    record: watch::Sender<Instance>,
    machine: Option<Arc<dyn Machine>>,
    /// Set by a deletion: a boot in progress stops waiting for the guest.
    cancel: watch::Sender<bool>,
    /// Set when the agent is about to exit.
    hurry: watch::Sender<bool>,
    running: Option<Running>,
    queue: VecDeque<Queued>,
}

/// How many commands may wait in a task's channel.
const CHANNEL: usize = 64;

impl InstanceTask {
    /// Starts the task of `instance`; it ends once the instance is deleted and forgotten.
    pub fn spawn(manager: Manager, instance: Instance) -> TaskHandle {
        let (commands, inbox) = mpsc::channel(CHANNEL);
        let (record, watcher) = watch::channel(instance.clone());
        let task = InstanceTask {
            manager,
            id: instance.id,
            record,
            machine: None,
            cancel: watch::Sender::new(false),
            hurry: watch::Sender::new(false),
            running: None,
            queue: VecDeque::new(),
        };
        tokio::spawn(task.run(inbox));
        TaskHandle { commands, record: watcher }
    }

    fn snapshot(&self) -> Instance {
        self.record.borrow().clone()
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        loop {
            let deadline = self.queue.iter().filter_map(|q| q.deadline).min();
            tokio::select! {
                done = poll_running(&mut self.running) => {
                    let running = self.running.take().expect("an operation was running");
                    if self.finish(running.op, running.reply, done).await {
                        break;
                    }
                    self.next().await;
                }
                command = inbox.recv() => match command {
                    Some(command) => self.handle(command).await,
                    // Every handle is gone: only a manager dropped (tests, `recover`) does it.
                    None => break,
                },
                () = sleep_until(deadline) => self.expire().await,
            }
        }
        for queued in self.queue.drain(..) {
            answer(queued.reply, Err(ManagerError::NotFound));
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Create => self.start(Op::Flow(Flow::Create), None),
            Command::Lifecycle { event, reply } => {
                // A state mismatch is answered at once; only a fitting command waits.
                if let Err(conflict) = transition::apply(&mut self.snapshot(), &event) {
                    return answer(Some(reply), Err(conflict.into()));
                }
                let deadline = Some(Instant::now() + OP_WAIT);
                self.enqueue(Queued { work: Work::Command(event), deadline, reply: Some(reply) });
                self.next().await;
            }
            Command::Delete { reply } => {
                let result = self.delete(None).await;
                answer(Some(reply), result);
            }
            Command::Keys { change, reply } => self.change_keys(change, reply).await,
            Command::Observed(event) => self.observed(event).await,
            Command::Lease(event) => {
                if let Err(e) = self.run_event(event.clone()).await {
                    tracing::error!(id = %self.id, ?event, error = %e, "cannot record the instance's state");
                }
            }
            Command::Restore { action, reply } => self.restore(action, reply).await,
            Command::Hurry => {
                self.hurry.send_replace(true);
            }
            Command::Publish => {
                if !self.snapshot().deleting {
                    self.enqueue(Queued { work: Work::Publish, deadline: None, reply: None });
                    self.next().await;
                }
            }
        }
    }

    /// Starts `op` now (nothing is running).
    fn start(&mut self, op: Op, reply: Option<Reply>) {
        debug_assert!(self.running.is_none());
        let context = ops::Context {
            manager: self.manager.clone(),
            record: self.record.subscribe(),
            cancel: self.cancel.subscribe(),
            hurry: self.hurry.subscribe(),
            machine: self.machine.clone(),
        };
        let future = Box::pin(ops::run(op.clone(), context));
        self.running = Some(Running { op, future, reply });
    }

    fn enqueue(&mut self, queued: Queued) {
        self.queue.push_back(queued);
    }

    /// Starts the next waiting work if nothing runs.
    async fn next(&mut self) {
        while self.running.is_none() {
            let Some(queued) = self.queue.pop_front() else { return };
            match queued.work {
                Work::Flow(flow) => self.start(Op::Flow(flow), queued.reply),
                Work::Publish => self.start(Op::Publish, queued.reply),
                Work::Keys { previous } => {
                    // Not running now: applied when the guest is reachable again.
                    if self.snapshot().status == Status::Running {
                        self.start(Op::Keys { previous }, queued.reply);
                    } else {
                        answer(queued.reply, Ok(()));
                    }
                }
                Work::Command(event) => match self.apply(&event).await {
                    Err(e) => answer(queued.reply, Err(e)),
                    Ok(None) => answer(queued.reply, Ok(())),
                    // Pause and resume are quick: the caller gets their outcome.
                    Ok(Some(flow @ (Flow::Pause | Flow::Resume))) => {
                        self.start(Op::Flow(flow), queued.reply)
                    }
                    Ok(Some(flow)) => {
                        answer(queued.reply, Ok(()));
                        self.start(Op::Flow(flow), None);
                    }
                },
            }
        }
    }

    /// Answers the waiting callers whose deadline passed.
    async fn expire(&mut self) {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) =
            self.queue.drain(..).partition(|q| q.deadline.is_some_and(|d| d <= now));
        self.queue = kept.into();
        for queued in expired {
            if let Work::Keys { previous } = queued.work {
                // Not applied: the record goes back to what the guest has.
                if let Err(e) = self.set_keys(previous).await {
                    answer(queued.reply, Err(e));
                    continue;
                }
            }
            let status = self.record.borrow().status;
            let reason = "another operation on the instance is in progress; try again".into();
            answer(queued.reply, Err(Conflict { status, reason }.into()));
        }
    }

    /// The one place an instance's status changes: `event` decided by
    /// [`transition::transition`], the record saved when it changed. Returns the flow the
    /// transition starts; on a refusal or a failed save the record is unchanged.
    async fn apply(&mut self, event: &Event) -> Result<Option<Flow>, ManagerError> {
        let event = event.clone();
        self.change(move |record| Ok(transition::apply(record, &event)?)).await
    }

    /// Changes the record and saves it (fsync, on the blocking pool); on a failed save the
    /// record is unchanged.
    async fn change<T: Send + 'static>(
        &mut self,
        change: impl FnOnce(&mut Instance) -> Result<T, ManagerError> + Send + 'static,
    ) -> Result<T, ManagerError> {
        let mut after = self.snapshot();
        let out = change(&mut after)?;
        if after != *self.record.borrow() {
            let store = self.manager.inner.store.clone();
            let saved = after.clone();
            tokio::task::spawn_blocking(move || store.save(&saved))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
            self.record.send_replace(after);
        }
        Ok(out)
    }

    async fn set_keys(&mut self, keys: Vec<String>) -> Result<(), ManagerError> {
        self.change(move |i| {
            i.ssh_keys = keys;
            Ok(())
        })
        .await
    }

    /// Applies an event and starts (or queues) the flow it names.
    async fn run_event(&mut self, event: Event) -> Result<(), ManagerError> {
        if let Some(flow) = self.apply(&event).await? {
            self.run_flow(flow).await;
        }
        Ok(())
    }

    /// Starts `flow` now, or after the operation in progress.
    async fn run_flow(&mut self, flow: Flow) {
        self.enqueue(Queued { work: Work::Flow(flow), deadline: None, reply: None });
        self.next().await;
    }

    /// Marks the instance deleted and starts its teardown (after the operation in progress,
    /// which a boot ends at once); `reply` is answered when the teardown is done.
    async fn delete(&mut self, reply: Option<Reply>) -> Result<(), ManagerError> {
        let flow = match self.apply(&Event::Delete).await? {
            Some(flow) => flow,
            // Marked deleting by a deletion that did not finish (the agent stopped, or the
            // teardown gave up): it runs again.
            None if self.snapshot().deleting && !self.deletion_under_way() => Flow::Delete,
            None => {
                self.attach_reply(reply);
                return Ok(()); // already being deleted
            }
        };
        self.cancel.send_replace(true);
        tracing::info!(id = %self.id, "instance deletion accepted");
        // Whatever waited for its turn will not get one: the deletion is next. (A deleting
        // instance takes no new work: commands are refused, events start nothing.)
        let status = self.record.borrow().status;
        for waiting in self.queue.drain(..) {
            let reason = "the instance is being deleted".into();
            answer(waiting.reply, Err(Conflict { status, reason }.into()));
        }
        self.queue.push_back(Queued { work: Work::Flow(flow), deadline: None, reply });
        self.next().await;
        Ok(())
    }

    /// Whether a deletion runs or waits for its turn.
    fn deletion_under_way(&self) -> bool {
        let deleting = |op: &Op| matches!(op, Op::Flow(Flow::Delete));
        self.running.as_ref().is_some_and(|r| deleting(&r.op))
            || self.queue.iter().any(|q| matches!(q.work, Work::Flow(Flow::Delete)))
    }

    async fn observed(&mut self, event: Event) {
        let before = self.record.borrow().status;
        match self.apply(&event).await {
            Ok(flow) => {
                let after = self.record.borrow().status;
                if after != before {
                    tracing::warn!(id = %self.id, ?event, status = %after, "the instance changed on its own");
                }
                // Running again on its own: configure it again (keys, SSH server). A flow in
                // progress (boot, reset) configures it anyway.
                if let Some(flow) = flow {
                    tracing::info!(id = %self.id, "instance started again on its own; configuring it");
                    self.run_flow(flow).await;
                }
            }
            Err(e) => {
                tracing::error!(id = %self.id, error = %e, "cannot record what the backend saw")
            }
        }
    }

    /// Records how an operation ended. Returns `true` when the instance is gone for good.
    async fn finish(&mut self, op: Op, reply: Option<Reply>, done: Done) -> bool {
        let id = self.id.clone();
        if let Some(machine) = done.machine {
            self.machine = machine;
        }
        if let Some(adoption) = done.adoption {
            let result = self.adopted(adoption).await;
            answer(reply, result);
            return false;
        }
        match (op, done.result) {
            (Op::Flow(Flow::Delete), Ok(true)) => {
                tracing::info!(%id, "instance deleted");
                answer(reply, Ok(()));
                return true;
            }
            (Op::Flow(Flow::Delete), result) => {
                // The record stays (marked deleting): the next start-up or `recover` retries.
                answer(reply, result.map(drop));
            }
            (Op::Flow(flow @ (Flow::Pause | Flow::Resume)), Ok(_)) => {
                let event = if flow == Flow::Pause { Event::Paused } else { Event::Resumed };
                answer(reply, self.apply(&event).await.map(drop));
            }
            (Op::Flow(Flow::Pause | Flow::Resume), Err(e)) => answer(reply, Err(e)),
            (Op::Flow(flow), Ok(true)) => match self.apply(&Event::Ready).await {
                Ok(_) => tracing::info!(%id, ?flow, "instance running"),
                Err(e) => tracing::error!(%id, error = %e, "cannot record the running state"),
            },
            (Op::Flow(flow), Ok(false)) => {
                tracing::info!(%id, ?flow, "stopped waiting: the instance is being deleted")
            }
            (Op::Flow(flow), Err(e)) => {
                tracing::warn!(%id, ?flow, error = %e, "instance operation failed");
                if let Err(save) = self.apply(&Event::Failed(e.to_string())).await {
                    tracing::error!(%id, error = %save, "cannot record the failure");
                }
            }
            (Op::Keys { previous }, Err(e)) => {
                // Not applied: the record goes back to what the guest has.
                let restored = self.set_keys(previous).await;
                answer(reply, restored.and(Err(e)));
            }
            (Op::Keys { .. } | Op::Publish, result) => answer(reply, result.map(drop)),
            (Op::Adopt, result) => {
                if let Err(e) = result {
                    tracing::warn!(%id, error = %e, "instance could not be adopted");
                    let failed = self.run_event(Event::Failed(e.to_string())).await;
                    answer(reply, failed);
                }
            }
            (Op::RollBack { reason }, result) => {
                if let Err(e) = &result {
                    tracing::error!(%id, error = %e, "rollback of an interrupted create is incomplete");
                }
                let failed = self.apply(&Event::Failed(reason)).await.map(drop);
                answer(reply, result.map(drop).and(failed));
            }
        }
        false
    }
}

fn answer(reply: Option<Reply>, result: Result<(), ManagerError>) {
    if let Some(reply) = reply {
        let _ = reply.send(result); // a caller that stopped waiting is fine
    }
}

async fn poll_running(running: &mut Option<Running>) -> Done {
    match running {
        Some(running) => (&mut running.future).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
