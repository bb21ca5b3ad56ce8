use std::path::PathBuf;

use super::*;
use crate::recovery::facts::FoundFile;
use crate::recovery::gpus::BoundGpu;

fn record(id: &str, status: Status, gpus: &[&str]) -> Instance {
    Instance {
        status,
        gpus: gpus.iter().map(|g| g.to_string()).collect(),
        ..Instance::sample(id, &serde_json::json!({}))
    }
}

fn owned(id: &str, pid: u32) -> Owned {
    Owned { instance_id: id.into(), what: format!("QEMU pid {pid}") }
}

fn file(path: &str, id: Option<&str>, kind: FileKind) -> FoundFile {
    FoundFile { path: PathBuf::from(path), id: id.map(str::to_owned), kind }
}

fn gpu(instance: &str, address: &str) -> BoundGpu {
    BoundGpu { instance: instance.into(), address: address.into() }
}

fn short(r: &Restore) -> &'static str {
    match r {
        Restore::Adopt => "adopt",
        Restore::Gone { .. } => "gone",
        Restore::RollBack { .. } => "rollback",
        Restore::Reboot => "reboot",
        Restore::TearDown => "teardown",
        Restore::Keep => "keep",
    }
}

/// One case: status, deleting, alive, has disk, has run, lease → decision.
type Case = (Status, bool, bool, bool, bool, Option<bool>, &'static str);

/// PROTOCOL.md §4 for one record.
#[test]
fn each_record_gets_the_policy_decision() {
    use Status::*;
    let table: &[Case] = &[
        // The lease unknown (`recover`, or before /init answers): adopt or report.
        (Running, false, true, true, true, None, "adopt"),
        (Paused, false, true, true, true, None, "adopt"),
        (Pending, false, true, true, true, None, "adopt"),
        (Rebooting, false, true, true, true, None, "adopt"),
        (Running, false, false, true, true, None, "gone"),
        (Paused, false, false, true, true, None, "gone"),
        (Pending, false, false, true, false, None, "rollback"),
        (Pending, false, false, false, false, None, "rollback"),
        (Error, false, false, true, true, None, "keep"),
        (Error, false, true, true, true, None, "keep"),
        // Pending that ran before: a boot from the renter's disk, never rolled back.
        (Pending, false, false, true, true, None, "gone"),
        (Pending, false, false, true, true, Some(true), "reboot"),
        // An interrupted deletion always finishes.
        (Running, true, true, true, true, None, "teardown"),
        (Error, true, false, false, true, Some(true), "teardown"),
        // The lease is over: everything goes.
        (Running, false, true, true, true, Some(false), "teardown"),
        (Running, false, false, true, true, Some(false), "teardown"),
        (Pending, false, true, true, true, Some(false), "teardown"),
        (Error, false, false, true, true, Some(false), "teardown"),
        // The lease goes on: what lives is adopted, what died boots from its disk.
        (Running, false, true, true, true, Some(true), "adopt"),
        (Running, false, false, true, true, Some(true), "reboot"),
        (Error, false, false, true, true, Some(true), "reboot"),
        (Running, false, false, false, true, Some(true), "gone"),
        (Pending, false, false, true, false, Some(true), "rollback"),
    ];
    for &(status, deleting, alive, has_disk, has_run, lease, want) in table {
        let mut r = record("a", status, &[]);
        r.deleting = deleting;
        let seen = Seen { alive, has_disk, has_run };
        let (got, why) = decide(&r, seen, lease);
        assert_eq!(
            short(&got),
            want,
            "{status} deleting={deleting} {seen:?} lease={lease:?}: {why}"
        );
    }
    let seen = Seen { alive: false, has_disk: true, has_run: true };
    let (gone, _) = decide(&record("a", Status::Running, &[]), seen, None);
    assert_eq!(gone, Restore::Gone { reason: "the VM exited while the agent was down".into() });
}

fn host() -> Facts {
    Facts {
        records: vec![
            record("live", Status::Running, &["0000:65:00.0"]),
            record("dead", Status::Running, &["0000:b3:00.0"]),
        ],
        owned: vec![owned("live", 100), owned("orphan", 200)],
        files: vec![
            file("/d/vms/live/disk.qcow2", Some("live"), FileKind::Overlay),
            file("/d/vms/dead/disk.qcow2", Some("dead"), FileKind::Overlay),
            file("/d/vms/orphan/disk.qcow2", Some("orphan"), FileKind::Overlay),
            file("/r/vms/orphan/qemu.pid", Some("orphan"), FileKind::Pidfile),
            file("/d/vms/leak/seed.img", Some("leak"), FileKind::Seed),
            file("/d/vms/leak/notes.txt", Some("leak"), FileKind::Foreign),
            file("/etc/frpc.d/leak.toml", Some("leak"), FileKind::Include),
            file("/etc/frpc.d/live.toml", Some("live"), FileKind::Include),
        ],
        bound_gpus: vec![
            gpu("live", "0000:65:00.0"),
            gpu("dead", "0000:b3:00.0"),
            gpu("gone", "0000:17:00.0"),
        ],
        lease: None,
    }
}

fn table(plan: &Plan) -> Vec<String> {
    let word = |a: Action| serde_json::to_value(a).unwrap().as_str().unwrap().to_owned();
    plan.rows.iter().map(|r| format!("{} | {} | {}", r.name, word(r.action), r.why)).collect()
}

/// Golden: the whole table for a host with a live VM, a dead one, an orphan QEMU, leaked
/// files, a foreign file and GPUs left on vfio-pci.
#[test]
fn a_host_after_a_crash_gets_this_plan() {
    let plan = plan(&host(), Mode::Agent);
    assert_eq!(
        table(&plan),
        [
            "instance live | adopted | its process is alive (running)",
            "instance dead | error | the VM exited while the agent was down",
            "QEMU pid 100 | adopted | instance live's",
            "QEMU pid 200 | stopped | carries the marker of orphan, which has no record",
            "/d/vms/live/disk.qcow2 | kept | instance live's",
            "/d/vms/dead/disk.qcow2 | kept | instance dead's",
            "/d/vms/orphan/disk.qcow2 | removed | left by instance orphan, which has no record",
            "/r/vms/orphan/qemu.pid | removed | left by instance orphan, which has no record",
            "/d/vms/leak/seed.img | removed | left by instance leak, which has no record",
            "/d/vms/leak/notes.txt | kept | not a file the agent makes",
            "/etc/frpc.d/leak.toml | removed | left by instance leak, which has no record",
            "/etc/frpc.d/live.toml | kept | instance live's",
            "0000:65:00.0 | kept | on vfio-pci for instance live",
            "0000:b3:00.0 | returned | bound for instance dead, which has no live VM",
            "0000:17:00.0 | returned | bound for instance gone, which has no live VM",
        ]
    );
    assert_eq!(plan.orphans, vec![owned("orphan", 200)]);
    let removed: Vec<&str> = plan.remove.iter().map(|p| p.to_str().unwrap()).collect();
    assert_eq!(
        removed,
        [
            "/d/vms/orphan/disk.qcow2",
            "/r/vms/orphan/qemu.pid",
            "/d/vms/leak/seed.img",
            "/etc/frpc.d/leak.toml"
        ]
    );
    assert_eq!(plan.return_gpus, ["dead", "gone"]);
}

#[test]
fn recover_leaves_live_instances_to_the_agent() {
    let plan = plan(&host(), Mode::Command);
    assert_eq!(
        table(&plan)[0],
        "instance live | kept | its process is alive (running); the agent adopts it when it starts"
    );
    assert_eq!(table(&plan)[2], "QEMU pid 100 | kept | instance live's");
}

/// Host maintenance: the live instance is stopped with its record and disk kept (in `error`
/// with the reason), its GPU returned; the rest is planned as by plain `recover`.
#[test]
fn stop_all_halts_live_instances_and_keeps_their_disks() {
    let plan = plan(&host(), Mode::StopAll);
    let t = table(&plan);
    assert_eq!(t[0], format!("instance live | stopped | {STOPPED}"));
    assert_eq!(t[2], "QEMU pid 100 | stopped | instance live's, stopped for host maintenance");
    assert!(t.contains(&"/d/vms/live/disk.qcow2 | kept | instance live's".into()), "{t:#?}");
    assert!(t.contains(
        &"0000:65:00.0 | returned | with instance live, stopped for host maintenance".into()
    ));
    assert_eq!(plan.halt, vec![owned("live", 100)]);
    assert_eq!(plan.orphans, vec![owned("orphan", 200)]);
    assert_eq!(plan.return_gpus, ["live", "dead", "gone"]);
    let live = plan.records.iter().find(|(r, _)| r.id == "live").unwrap();
    assert_eq!(live.1, Restore::Gone { reason: STOPPED.to_owned() });
    // Without --stop-all the same host keeps it running.
    let plain = plan_of(Mode::Command);
    assert!(plain.halt.is_empty() && !plain.return_gpus.contains(&"live".to_owned()));
}

fn plan_of(mode: Mode) -> Plan {
    plan(&host(), mode)
}

#[test]
fn the_lease_decides_teardown_and_reboot() {
    let over = plan(&Facts { lease: Some(false), ..host() }, Mode::Agent);
    let t = table(&over);
    assert!(
        t.contains(&"instance live | stopped | the control plane says the lease is over".into())
    );
    assert!(t.contains(
        &"/d/vms/live/disk.qcow2 | removed | with instance live, which is torn down".into()
    ));
    assert!(t.contains(&"0000:65:00.0 | returned | with instance live's teardown".into()));
    assert!(!over.return_gpus.contains(&"live".to_owned()), "teardown returns it itself");

    let on = plan(&Facts { lease: Some(true), ..host() }, Mode::Agent);
    let t = table(&on);
    assert!(t.contains(
        &"instance dead | rebooted | gone, but the control plane says the lease goes on".into()
    ));
    assert!(t.contains(&"0000:b3:00.0 | kept | on vfio-pci for instance dead".into()));
}

#[test]
fn nothing_found_plans_nothing() {
    assert_eq!(plan(&Facts::default(), Mode::Agent), Plan::default());
}
