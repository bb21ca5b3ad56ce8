use super::*;

const STATUSES: [Status; 6] = [
    Status::Pending,
    Status::Running,
    Status::Paused,
    Status::Rebooting,
    Status::Error,
    Status::Destroyed,
];

fn events() -> Vec<Event> {
    vec![
        Event::Start,
        Event::Stop,
        Event::Restart,
        Event::Delete,
        Event::Reboot,
        Event::Adopted,
        Event::Ready,
        Event::Paused,
        Event::Resumed,
        Event::Failed("boom".into()),
        Event::StartedAgain,
    ]
}

/// What a transition gave, as the table spells it: `409` a conflict, `=` nothing changes,
/// `=Flow` the same status with a flow, `Status` or `Status Flow` a change; `del Delete` the
/// deletion mark set; `Error` carries the event's reason.
fn spell(result: Result<Next, Conflict>, before: State) -> String {
    let Ok(next) = result else { return "409".into() };
    let flow = next.flow.map(|f| format!("{f:?}"));
    if next.state.deleting != before.deleting {
        return format!("del {}", flow.unwrap_or_default());
    }
    let status = if next.state.status == before.status {
        "=".to_owned()
    } else {
        format!("{:?} ", next.state.status)
    };
    format!("{status}{}", flow.unwrap_or_default()).trim().to_owned()
}

/// Every (event, status) pair of an instance not being deleted. Columns: Pending, Running,
/// Paused, Rebooting, Error, Destroyed.
#[rustfmt::skip]
const TABLE: [(&str, [&str; 6]); 11] = [
    ("Start",        ["409",          "=",             "=Resume",     "409",          "Pending Boot",  "409"]),
    ("Stop",         ["409",          "=Pause",        "=",           "409",          "409",           "409"]),
    ("Restart",      ["409",          "Rebooting Reset","Rebooting Reset","409",      "409",           "409"]),
    ("Delete",       ["del Delete",   "del Delete",    "del Delete",  "del Delete",   "del Delete",    "409"]),
    ("Reboot",       ["=",            "=",             "=",           "=",            "Pending Boot",  "409"]),
    ("Adopted",      ["=Settle",      "=Reconfigure",  "=",           "=Settle",      "=",             "409"]),
    ("Ready",        ["Running",      "=",             "409",         "Running",      "409",           "409"]),
    ("Paused",       ["409",          "Paused",        "409",         "409",          "409",           "409"]),
    ("Resumed",      ["409",          "409",           "Running",     "409",          "409",           "409"]),
    ("Failed",       ["Error",        "Error",         "Error",       "Error",        "=",             "409"]),
    ("StartedAgain", ["=",            "=Reconfigure",  "=",           "=",            "Pending Settle","409"]),
];

#[test]
fn every_pair_of_event_and_status_is_decided_as_the_table_says() {
    let events = events();
    for (row, (name, expected)) in TABLE.iter().enumerate() {
        let event = &events[row];
        assert!(format!("{event:?}").starts_with(name), "row {row} is {event:?}, not {name}");
        for (status, want) in STATUSES.iter().zip(expected) {
            let before = State { status: *status, deleting: false };
            let seen = spell(transition(before, None, event), before);
            assert_eq!(&seen, want, "{event:?} on {status}");
        }
    }
}

/// While a deletion runs, commands are refused and everything else changes nothing.
#[test]
fn a_deletion_in_progress_owns_the_instance() {
    for status in STATUSES {
        let before = State { status, deleting: true };
        for event in events() {
            let seen = spell(transition(before, Some("old"), &event), before);
            let want = match event {
                Event::Start | Event::Stop | Event::Restart => "409",
                _ => "=",
            };
            assert_eq!(seen, want, "{event:?} on {status} while deleting");
        }
    }
}

#[test]
fn an_error_keeps_its_first_reason_and_leaving_error_clears_it() {
    let error = State { status: Status::Error, deleting: false };
    let again = transition(error, Some("QEMU exited"), &Event::Failed("later".into())).unwrap();
    assert_eq!(again.error.as_deref(), Some("QEMU exited"));
    let boot = transition(error, Some("QEMU exited"), &Event::Start).unwrap();
    assert_eq!((boot.state.status, boot.error), (Status::Pending, None));
    let pending = State { status: Status::Pending, deleting: false };
    let failed = transition(pending, None, &Event::Failed("no SSH".into())).unwrap();
    assert_eq!(failed.error.as_deref(), Some("no SSH"));
    let deleting = transition(error, Some("QEMU exited"), &Event::Delete).unwrap();
    assert_eq!(deleting.error.as_deref(), Some("QEMU exited"), "the reason stays while deleting");
}

#[test]
fn a_refused_command_names_the_state() {
    let pending = State { status: Status::Pending, deleting: false };
    let err = transition(pending, None, &Event::Start).unwrap_err();
    assert_eq!(err.to_string(), "start does not fit now (the instance is pending)");
    let deleting = State { status: Status::Running, deleting: true };
    let err = transition(deleting, None, &Event::Restart).unwrap_err();
    assert_eq!(err.to_string(), "the instance is being deleted (the instance is running)");
}
