//! The QEMU backend's building blocks against the real tools: qemu-system-x86_64 under TCG
//! (q35 + OVMF, started paused; no guest disk is needed), qemu-img, mkfs.vfat and mtools.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qapi_qmp::RunState;
use qudata_agent::backend::qemu::accel::{self, Accel, ProbeOutcome};
use qudata_agent::backend::qemu::argv::{VmPlan, qemu_argv};
use qudata_agent::backend::qemu::layout::VmPaths;
use qudata_agent::backend::qemu::process::{self, Spawned};
use qudata_agent::backend::qemu::procfs::ProcRoot;
use qudata_agent::backend::qemu::qmp::socket::MonitorSocket;
use qudata_agent::backend::qemu::qmp::{Qmp, QmpEvent};
use qudata_agent::backend::qemu::topology::Topology;
use qudata_agent::backend::qemu::vm_process::{Ladder, Owner, Stopped, VmProcess};
use qudata_agent::backend::qemu::{disk, diskio, seed};
use qudata_agent::config::AccelChoice;
use tokio::sync::broadcast;

use crate::support::wait::wait_until;

const QEMU: &str = "qemu-system-x86_64";
const STORAGE_GB: u64 = 2;
const LIMIT: Duration = Duration::from_secs(30);
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0qudatatestkey agent@host";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Who owns instance `id`'s QEMU when the agent's run dir is `<dir>/run`.
fn owner(dir: &Path, id: &str) -> Owner {
    Owner { proc: ProcRoot::default(), run_dir: dir.join("run"), id: id.to_owned() }
}

/// A VM's files, built by the modules under test, in `dir`; its monitor socket and pidfile
/// where the agent's layout puts them under `<dir>/run`.
async fn prepare(dir: &Path, id: &str) -> VmPlan {
    let layout = VmPaths::new(&dir.join("data"), &dir.join("run"), id);
    std::fs::create_dir_all(&layout.run_dir).unwrap();
    let base = dir.join("base.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    let overlay = dir.join("disk.qcow2");
    let qemu_img = disk::qemu_img_for(Path::new(QEMU));
    disk::create_overlay(&qemu_img, &base, &overlay, STORAGE_GB).await.unwrap();
    let seed_path = dir.join("seed.img");
    let hostname = format!("qudata-{id}");
    let content = seed::SeedContent {
        instance_id: id,
        hostname: &hostname,
        management_public_key: KEY,
        mac: None,
    };
    seed::build_seed(&seed_path, &content).await.unwrap();
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();
    let vars = dir.join("OVMF_VARS.fd");
    disk::copy_vars(&ovmf.vars_template, &vars).unwrap();
    VmPlan {
        id: id.to_owned(),
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 256,
        ovmf_code: ovmf.code,
        ovmf_vars: vars,
        overlay,
        seed: seed_path,
        nic: None,
        qmp_socket: layout.qmp,
        qmp_fd: None,
        pidfile: layout.pidfile,
        serial_log: dir.join("serial.log"),
        gpus: vec![],
        topology: Topology::unplaced(1, 256),
        disk_io: diskio::probe(Path::new(QEMU), dir).await,
    }
}

/// Kills a test's QEMU if the test fails half-way (QEMU is deliberately not killed on drop).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if ProcRoot::default().is_alive(self.0) {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
}

/// QEMU started as the agent starts it: its monitor a listening socket the test binds and
/// QEMU inherits.
async fn start(plan: &VmPlan, log: &Path) -> (Spawned, Qmp, KillOnDrop) {
    let monitor = MonitorSocket::bind(&plan.qmp_socket).unwrap();
    let plan = VmPlan { qmp_fd: Some(monitor.fd()), ..plan.clone() };
    let setup = process::ChildSetup { inherit: &[monitor.fd()], ..Default::default() };
    let spawned = process::spawn_with(Path::new(QEMU), &qemu_argv(&plan), log, &setup).unwrap();
    drop(monitor);
    let guard = KillOnDrop(spawned.pid);
    let qmp = Qmp::connect(&plan.qmp_socket, LIMIT).await.unwrap();
    (spawned, qmp, guard)
}

/// The next event the backend acts on (QEMU may interleave others).
async fn next_event(events: &mut broadcast::Receiver<QmpEvent>) -> QmpEvent {
    loop {
        match tokio::time::timeout(LIMIT, events.recv()).await.unwrap().unwrap() {
            QmpEvent::Other(_) => continue,
            event => return event,
        }
    }
}

/// The file's text once it contains `needle`.
async fn wait_for_text(path: &Path, needle: &str, limit: Duration) -> String {
    let what = format!("{needle:?} in {path:?}");
    wait_until(what, limit, Duration::from_millis(200), async || {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if text.contains(needle) { Ok(text) } else { Err(text) }
    })
    .await
}

async fn status(qmp: &Qmp) -> RunState {
    qmp.query_status().await.unwrap().status
}

#[tokio::test]
async fn a_paused_vm_is_driven_over_qmp_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let plan = prepare(dir.path(), "it-qmp").await;
    let log = dir.path().join("qemu.log");
    let (spawned, qmp, _guard) = start(&plan, &log).await;
    let mut events = qmp.subscribe();

    assert_eq!(status(&qmp).await, RunState::prelaunch);
    qmp.cont().await.unwrap();
    assert_eq!(next_event(&mut events).await, QmpEvent::Resume);
    assert_eq!(status(&qmp).await, RunState::running);
    // OVMF from the pflash drives runs and tries the virtio disks (both empty of loaders).
    let serial = wait_for_text(&plan.serial_log, "BdsDxe", Duration::from_secs(180)).await;
    assert!(serial.contains("PciRoot"), "{serial}");
    qmp.stop().await.unwrap();
    assert_eq!(next_event(&mut events).await, QmpEvent::Stop);
    assert_eq!(status(&qmp).await, RunState::paused);
    qmp.system_reset().await.unwrap();
    assert_eq!(next_event(&mut events).await, QmpEvent::Reset);

    // The pidfile names this QEMU, and only this instance owns it.
    assert_eq!(process::read_pidfile(&plan.pidfile).unwrap(), spawned.pid);
    let adopted = VmProcess::adopt(&owner(dir.path(), "it-qmp")).expect("adopted");
    assert_eq!(adopted.pid(), spawned.pid);
    assert!(VmProcess::adopt(&owner(dir.path(), "it-other")).is_none());
    // Another instance's pidfile naming a process that is not its QEMU (this test).
    let unrelated = VmPaths::new(&dir.path().join("data"), &dir.path().join("run"), "it-x");
    std::fs::create_dir_all(&unrelated.run_dir).unwrap();
    std::fs::write(&unrelated.pidfile, std::process::id().to_string()).unwrap();
    assert!(VmProcess::adopt(&owner(dir.path(), "it-x")).is_none());

    qmp.quit().await.unwrap();
    let shutdown = QmpEvent::Shutdown { guest: false, reason: "host-qmp-quit".into() };
    assert_eq!(next_event(&mut events).await, shutdown);
    let exit = spawned.wait_exit(LIMIT).await.unwrap();
    assert!(exit.contains("exit status: 0"), "{exit}");
    // The adopted handle sees the exit of a process that is not its child.
    tokio::time::timeout(LIMIT, adopted.exited()).await.unwrap();
    assert!(!ProcRoot::default().is_alive(spawned.pid));
    assert!(VmProcess::adopt(&owner(dir.path(), "it-qmp")).is_none());
    tokio::time::timeout(LIMIT, qmp.closed()).await.unwrap();
}

#[tokio::test]
async fn signals_stop_only_the_owned_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let plan = prepare(dir.path(), "it-term").await;
    let (spawned, qmp, _guard) = start(&plan, &dir.path().join("qemu.log")).await;
    // QEMU runs in its own process group, so a signal to the agent's group misses it.
    let pgid = process_group(spawned.pid);
    assert_eq!(pgid, spawned.pid);

    // Another instance's pidfile naming this QEMU finds nothing to stop.
    let nobody = VmPaths::new(&dir.path().join("data"), &dir.path().join("run"), "it-nobody");
    std::fs::create_dir_all(&nobody.run_dir).unwrap();
    std::fs::copy(&plan.pidfile, &nobody.pidfile).unwrap();
    assert!(VmProcess::adopt(&owner(dir.path(), "it-nobody")).is_none());
    assert!(VmProcess::scan(&owner(dir.path(), "it-nobody")).is_empty());
    assert!(ProcRoot::default().is_alive(spawned.pid));

    let signals = Ladder { powerdown: None, quit: None, term: LIMIT, ..Ladder::abort() };
    let ours = VmProcess::adopt(&owner(dir.path(), "it-term")).expect("adopted");
    assert_eq!(ours.stop(&signals).await.unwrap(), Stopped::Terminated);
    spawned.wait_exit(LIMIT).await.unwrap();
    tokio::time::timeout(LIMIT, qmp.closed()).await.unwrap();
    assert_eq!(ours.stop(&signals).await.unwrap(), Stopped::NotRunning);
    assert!(VmProcess::adopt(&owner(dir.path(), "it-term")).is_none());
}

#[tokio::test]
async fn a_vm_that_never_ran_is_told_to_quit() {
    let dir = tempfile::tempdir().unwrap();
    let plan = prepare(dir.path(), "it-abort").await;
    let log = dir.path().join("qemu.log");
    let monitor = MonitorSocket::bind(&plan.qmp_socket).unwrap();
    let argv = qemu_argv(&VmPlan { qmp_fd: Some(monitor.fd()), ..plan.clone() });
    let setup = process::ChildSetup { inherit: &[monitor.fd()], ..Default::default() };
    let vm = VmProcess::spawn(owner(dir.path(), "it-abort"), Path::new(QEMU), &argv, &log, &setup)
        .unwrap();
    drop(monitor);
    let _guard = KillOnDrop(vm.pid());
    // Paused in prelaunch: no power button, `quit` over a monitor the stop opens itself.
    assert_eq!(vm.stop(&Ladder::abort()).await.unwrap(), Stopped::Quit);
    let status = vm.exit_status().await.unwrap();
    assert!(status.contains("exit status: 0"), "{status}");
}

/// The process group of `pid`, from `/proc/<pid>/stat` (field 5).
fn process_group(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[tokio::test]
async fn disks_and_seed_are_what_the_guest_expects() {
    let dir = tempfile::tempdir().unwrap();
    let plan = prepare(dir.path(), "it-disk").await;
    let info = disk::image_info(Path::new("qemu-img"), &plan.overlay).await.unwrap();
    let base = dir.path().join("base.qcow2").canonicalize().unwrap();
    assert_eq!(info.backing_filename.map(PathBuf::from), Some(base));
    assert_eq!(info.virtual_size, STORAGE_GB << 30);

    let image = plan.seed.to_str().unwrap();
    let listing = run("mdir", &["-i", image, "::"]);
    assert!(listing.contains("CIDATA"), "{listing}");
    let meta = run("mtype", &["-i", image, "::meta-data"]);
    assert_eq!(meta, seed::meta_data("it-disk", "qudata-it-disk"));
    let user = run("mtype", &["-i", image, "::user-data"]);
    assert_eq!(user, seed::user_data("qudata-it-disk", KEY));
    assert!(user.contains(KEY));
}

#[tokio::test]
async fn the_probe_guest_runs_under_tcg_and_auto_agrees_with_the_kvm_probe() {
    let dir = tempfile::tempdir().unwrap();
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();
    let qemu = Path::new(QEMU);
    let tcg = accel::run_probe(qemu, &ovmf, Accel::Tcg, dir.path(), LIMIT).await.unwrap();
    assert_eq!(tcg, ProbeOutcome::Works);

    let kvm = accel::kvm_probe(qemu, &ovmf, dir.path()).await.unwrap();
    eprintln!("KVM probe on this host: {kvm:?}");
    let chosen = accel::decide(AccelChoice::Auto, qemu, &ovmf, dir.path()).await.unwrap();
    let forced = accel::decide(AccelChoice::Kvm, qemu, &ovmf, dir.path()).await;
    match kvm {
        ProbeOutcome::Works => {
            assert_eq!(chosen.accel, Accel::Kvm);
            assert_eq!(forced.unwrap().accel, Accel::Kvm);
        }
        ProbeOutcome::Fails { detail } => {
            assert_eq!(chosen.accel, Accel::Tcg);
            assert_eq!(chosen.reason, format!("KVM cannot run guests on this host: {detail}"));
            let err = forced.unwrap_err().to_string();
            assert!(err.contains("QUDATA_QEMU_ACCEL=auto or tcg"), "{err}");
        }
    }
    let forced_tcg = accel::decide(AccelChoice::Tcg, qemu, &ovmf, dir.path()).await.unwrap();
    assert_eq!(forced_tcg.accel, Accel::Tcg);
    // The answer is cached for this boot.
    let cached = std::fs::read_to_string(dir.path().join("accel-probe.json")).unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(cached.contains(boot_id.trim()), "{cached}");
}
