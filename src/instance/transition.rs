//! The instance state machine: every change of an instance's status (and of its `deleting`
//! mark) is decided by [`transition`], a pure function with a table test of every pair (in
//! the spirit of Cloud Hypervisor's `VmState::valid_transition`). The manager applies what it
//! returns and runs the [`Flow`] it names; `recover` uses it offline.

use super::model::{Instance, Status};

/// Where an instance is: its status, and whether a deletion has begun.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    pub status: Status,
    pub deleting: bool,
}

/// What happens to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `PUT /instances` `start`: resume a paused guest, or boot a failed one from its disk.
    Start,
    /// `PUT /instances` `stop`: pause the vCPUs.
    Stop,
    /// `PUT /instances` `restart`: reset the guest.
    Restart,
    /// `DELETE /instances`, or the lease is over: tear down and forget.
    Delete,
    /// The lease goes on but the instance's process is gone: boot it from its disk.
    Reboot,
    /// Its process was found alive after an agent restart and reattached.
    Adopted,
    /// A boot, reset or reconfiguration reached a configured guest.
    Ready,
    /// The vCPUs were stopped (`Stop` done).
    Paused,
    /// The vCPUs run again (`Start` on a paused guest done).
    Resumed,
    /// An operation failed, or the instance stopped working on its own: why.
    Failed(String),
    /// The instance runs again on its own (a restart policy, an engine that came back).
    StartedAgain,
}

/// The work a transition starts; the manager runs it under the instance's operation lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Launch, wait for the guest, configure; rolled back on failure.
    Create,
    /// Start again from disk after the process is gone.
    Boot,
    /// Guest reset, then wait for it again.
    Reset,
    /// Adopted while pending or rebooting: wait for the guest, configure.
    Settle,
    /// Adopted while running: re-apply keys and the command.
    Reconfigure,
    Pause,
    Resume,
    Delete,
}

/// The outcome of a transition: the new state, the error reason to record (`Some` only with
/// [`Status::Error`]), and the flow to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    pub state: State,
    pub error: Option<String>,
    pub flow: Option<Flow>,
}

/// The event does not fit the state (a command: 409 with the state in the message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (the instance is {status})")]
pub struct Conflict {
    pub status: Status,
    pub reason: String,
}

/// Decides what `event` does to an instance in `state` with `error` recorded. Events that
/// change nothing (a `stop` of a paused guest, an exit seen during a deletion) return the
/// same state and no flow.
pub fn transition(state: State, error: Option<&str>, event: &Event) -> Result<Next, Conflict> {
    use Event as E;
    use Status as S;
    let State { status, deleting } = state;
    let stay = || Next { state, error: error.map(str::to_owned), flow: None };
    let to = |status: Status, flow: Option<Flow>| Next {
        state: State { status, deleting },
        error: None,
        flow,
    };
    let refuse = |reason: String| Err(Conflict { status, reason });
    if deleting {
        // The delete flow owns the instance now: outcomes are its business.
        return match event {
            E::Start | E::Stop | E::Restart => refuse("the instance is being deleted".into()),
            _ => Ok(stay()),
        };
    }
    Ok(match (event, status) {
        (_, S::Destroyed) => return refuse("there is no instance".into()),
        (E::Delete, _) => Next {
            state: State { status, deleting: true },
            error: error.map(str::to_owned),
            flow: Some(Flow::Delete),
        },
        (E::Failed(reason), _) if status == S::Error => Next {
            state,
            // The first reason is the one that explains it; a later one is a consequence.
            error: Some(error.unwrap_or(reason).to_owned()),
            flow: None,
        },
        (E::Failed(reason), _) => Next {
            state: State { status: S::Error, deleting },
            error: Some(reason.clone()),
            flow: None,
        },

        (E::Start, S::Running) | (E::Stop, S::Paused) => stay(),
        (E::Start, S::Paused) => Next { flow: Some(Flow::Resume), ..stay() },
        (E::Start, S::Error) => to(S::Pending, Some(Flow::Boot)),
        (E::Stop, S::Running) => Next { flow: Some(Flow::Pause), ..stay() },
        (E::Restart, S::Running | S::Paused) => to(S::Rebooting, Some(Flow::Reset)),
        (E::Start | E::Stop | E::Restart, _) => {
            let command = format!("{event:?}").to_lowercase();
            return refuse(format!("{command} does not fit now"));
        }

        (E::Reboot, S::Error) => to(S::Pending, Some(Flow::Boot)),
        (E::Reboot, _) => stay(),
        (E::Adopted, S::Pending | S::Rebooting) => Next { flow: Some(Flow::Settle), ..stay() },
        (E::Adopted, S::Running) => Next { flow: Some(Flow::Reconfigure), ..stay() },
        (E::Adopted, S::Paused | S::Error) => stay(),
        (E::StartedAgain, S::Error) => to(S::Pending, Some(Flow::Settle)),
        (E::StartedAgain, S::Running) => Next { flow: Some(Flow::Reconfigure), ..stay() },
        (E::StartedAgain, _) => stay(),

        (E::Ready, S::Pending | S::Rebooting | S::Running) => to(S::Running, None),
        (E::Paused, S::Running) => to(S::Paused, None),
        (E::Resumed, S::Paused) => to(S::Running, None),
        (E::Ready | E::Paused | E::Resumed, _) => {
            return refuse(format!("{event:?} does not fit now").to_lowercase());
        }
    })
}

/// Applies `event` to a record: the only code that writes an instance's status, error and
/// deletion mark (the manager saves the record after, `recover` likewise). Returns the flow
/// to run; on a conflict the record is unchanged.
pub fn apply(instance: &mut Instance, event: &Event) -> Result<Option<Flow>, Conflict> {
    let state = State { status: instance.status, deleting: instance.deleting };
    let next = transition(state, instance.error.as_deref(), event)?;
    instance.status = next.state.status;
    instance.deleting = next.state.deleting;
    instance.error = next.error;
    Ok(next.flow)
}

#[cfg(test)]
mod tests;
