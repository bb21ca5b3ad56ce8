//! QMP events the backend acts on; every other event is kept by name only.

use serde_json::Value;

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpEvent {
    /// `GUEST_PANICKED`: the guest kernel reported a panic (pvpanic).
    GuestPanicked,
    /// `POWERDOWN`: a power-button press reached the guest.
    Powerdown,
    /// `RESET`: the guest was reset.
    Reset,
    /// `RESUME`: vCPUs run again.
    Resume,
    /// `SHUTDOWN`: QEMU is shutting the VM down; `guest` when the guest asked for it.
    Shutdown { guest: bool, reason: String },
    /// `STOP`: vCPUs stopped.
    Stop,
    /// Any other event, by name (newer QEMUs add events; they never break the reader).
    Other(String),
}

impl QmpEvent {
    /// The event named `name` with its optional `data` object.
    pub fn from_message(name: &str, data: Option<&Value>) -> QmpEvent {
        match name {
            "GUEST_PANICKED" => QmpEvent::GuestPanicked,
            "POWERDOWN" => QmpEvent::Powerdown,
            "RESET" => QmpEvent::Reset,
            "RESUME" => QmpEvent::Resume,
            "STOP" => QmpEvent::Stop,
            "SHUTDOWN" => {
                let field = |key: &str| data.and_then(|d| d.get(key));
                QmpEvent::Shutdown {
                    guest: field("guest").and_then(Value::as_bool).unwrap_or(false),
                    reason: field("reason").and_then(Value::as_str).unwrap_or("unknown").to_owned(),
                }
            }
            other => QmpEvent::Other(other.to_owned()),
        }
    }
}
