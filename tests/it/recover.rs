//! Recovery against real QEMUs (cheap ones: `-S`, no disk): the backend's view of what it owns,
//! and orphans reaped without touching anything the agent did not make.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use qudata_agent::backend::qemu::QemuSweeper;
use qudata_agent::backend::qemu::layout::VmPaths;
use qudata_agent::backend::{HostSweeper, Owned};
use qudata_agent::instance::Status;
use qudata_agent::vfio::{SysfsRoot, Vfio};
use serde_json::Value;

use crate::support::agent::{Agent, Dirs, recover_command};
use crate::support::orphans::{TestQemu, foreign, orphan};
use crate::support::records::store_record;
use crate::support::wait::wait_until_blocking;

/// What recovery sweeps QEMUs with: only where things live, nothing half-built.
fn sweeper(data: &Path, run: &Path) -> QemuSweeper {
    QemuSweeper {
        data_dir: data.to_owned(),
        run_dir: run.to_owned(),
        proc_root: Default::default(),
        vfio: Arc::new(Vfio::new(SysfsRoot::new(data.join("sys")), data)),
        powerdown_grace: Duration::from_secs(5),
        host_nvml: None,
    }
}

#[tokio::test]
async fn the_sweeper_finds_and_reaps_only_its_own_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let mut ours = orphan(&data, &run, "orphan-1");
    // Another agent's VM (same marker, other run dir) and a QEMU without the marker.
    let mut other_agent = orphan(&dir.path().join("d2"), &dir.path().join("r2"), "orphan-1");
    let mut stranger = foreign(&dir.path().join("elsewhere"), "web-server");
    let paths = ours.paths.clone().unwrap();
    let stray = paths.dir.join("renter-notes.txt");
    std::fs::write(&stray, "not the agent's").unwrap();

    let qemu = sweeper(&data, &run);
    let found = qemu.find_owned().await.unwrap();
    let want = Owned { instance_id: "orphan-1".into(), what: format!("QEMU pid {}", ours.pid()) };
    assert_eq!(found, vec![want.clone()]);

    qemu.reap(&want).await.unwrap();
    assert!(!ours.alive(), "the orphan is stopped");
    assert!(other_agent.alive() && stranger.alive(), "nothing else is touched");
    for file in [&paths.overlay, &paths.vars, &paths.seed, &paths.pidfile, &paths.qmp] {
        assert!(!file.exists(), "{} removed", file.display());
    }
    assert!(!paths.run_dir.exists());
    assert!(stray.exists(), "a file the agent did not make survives, and so does its folder");
    assert_eq!(qemu.find_owned().await.unwrap(), vec![]);
    qemu.reap(&want).await.unwrap(); // idempotent
}

fn recover(dirs: &Dirs, args: &[&str]) -> Output {
    recover_command(dirs).args(args).output().expect("run qudata-agent recover")
}

fn rows(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    report["rows"].as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    let found = rows.iter().find(|r| r["name"].as_str().unwrap().ends_with(name));
    found.unwrap_or_else(|| panic!("no row for {name} in {rows:#?}"))
}

/// What a crashed agent leaves: an orphan QEMU with its files, the files of another instance
/// with no record (stale pidfile, frpc include), a record whose VM is gone; beside them a
/// QEMU of another agent, a QEMU without the marker and files the agent did not make.
struct Crashed {
    dirs: Dirs,
    orphan: TestQemu,
    other_agent: TestQemu,
    stranger: TestQemu,
    leaked: Vec<PathBuf>,
    foreign_files: Vec<PathBuf>,
    kept_disk: PathBuf,
}

fn crashed_host() -> Crashed {
    let dirs = Dirs::new();
    let orphan = orphan(&dirs.data, &dirs.run, "orphan-a");
    let other_agent = orphan_of_other_agent(&dirs);
    let stranger = foreign(&dirs.root.path().join("elsewhere"), "qudata-like-but-not");
    let leak = VmPaths::new(&dirs.data, &dirs.run, "leak-b");
    let include = dirs.root.path().join("etc/frpc.d/leak-b.toml");
    for dir in [&leak.dir, &leak.run_dir, &include.parent().unwrap().to_owned()] {
        std::fs::create_dir_all(dir).unwrap();
    }
    // A pidfile naming a live process that is not QEMU: pid reuse must not fool recovery.
    std::fs::write(&leak.pidfile, std::process::id().to_string()).unwrap();
    std::fs::write(&leak.seed, "").unwrap();
    std::fs::write(&include, "[[proxies]]\n").unwrap();
    let foreign_files = vec![dirs.data.join("vms/README"), leak.dir.join("renter-notes.txt")];
    for f in &foreign_files {
        std::fs::write(f, "not the agent's").unwrap();
    }
    store_record(&dirs.data, "rec-c", Status::Running, false);
    let kept = VmPaths::new(&dirs.data, &dirs.run, "rec-c");
    std::fs::create_dir_all(&kept.dir).unwrap();
    std::fs::write(&kept.overlay, "").unwrap();
    let mut leaked = orphan.paths.as_ref().unwrap().files().map(Path::to_owned).to_vec();
    leaked.retain(|p| p.exists());
    leaked.extend([leak.pidfile.clone(), leak.seed.clone(), include]);
    Crashed { dirs, orphan, other_agent, stranger, leaked, foreign_files, kept_disk: kept.overlay }
}

fn orphan_of_other_agent(dirs: &Dirs) -> TestQemu {
    orphan(&dirs.root.path().join("other/data"), &dirs.root.path().join("other/run"), "orphan-a")
}

#[tokio::test]
async fn recover_lists_then_cleans_up_exactly_what_the_agent_left() {
    let mut host = crashed_host();
    let dirs = &host.dirs;

    let planned = rows(&recover(dirs, &["--dry-run", "--json"]));
    let orphan_row = row(&planned, &format!("QEMU pid {}", host.orphan.pid()));
    assert_eq!(orphan_row["action"], "stopped", "{orphan_row}");
    assert_eq!(row(&planned, "instance rec-c")["action"], "error");
    assert_eq!(row(&planned, "leak-b.toml")["action"], "removed");
    assert_eq!(row(&planned, "vms/README")["action"], "kept");
    assert!(
        host.orphan.alive() && host.leaked.iter().all(|p| p.exists()),
        "dry run changed things"
    );
    assert_eq!(crate::support::vm::record(dirs, "rec-c")["status"], "running");

    let out = recover(dirs, &[]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.starts_with("WHAT"), "{table}");
    let line = |needle: &str| table.lines().find(|l| l.contains(needle)).unwrap_or("").to_owned();
    assert!(line(&format!("QEMU pid {}", host.orphan.pid())).contains("stopped"), "{table}");
    assert!(line("instance rec-c").contains("the VM exited while the agent was down"), "{table}");
    assert!(!host.orphan.alive(), "the orphan QEMU is stopped");
    for path in &host.leaked {
        assert!(!path.exists(), "{} left behind:\n{table}", path.display());
    }
    assert!(!dirs.run.join("vms/orphan-a").exists() && !dirs.data.join("vms/orphan-a").exists());
    assert!(host.other_agent.alive() && host.stranger.alive(), "a QEMU not ours was touched");
    for path in host.foreign_files.iter().chain([&host.kept_disk]) {
        assert!(path.exists(), "{} was removed:\n{table}", path.display());
    }
    let rec = crate::support::vm::record(dirs, "rec-c");
    assert_eq!(rec["status"], "error");
    assert_eq!(rec["error"], "the VM exited while the agent was down");

    // Idempotent: a second run finds only what stays.
    let again = rows(&recover(dirs, &["--json"]));
    let acted: Vec<&Value> = again.iter().filter(|r| r["action"] != "kept").collect();
    assert!(acted.is_empty(), "{acted:#?}");
}

#[tokio::test]
async fn the_agent_reconciles_before_serving_and_holds_the_lock() {
    let dirs = Dirs::new();
    let mut stray = orphan(&dirs.data, &dirs.run, "orphan-z");
    let mut agent = Agent::local(&dirs);
    agent.wait_ready().await;
    assert!(!stray.alive(), "an orphan is stopped before the API serves");
    assert!(!dirs.data.join("vms/orphan-z").exists());

    let out = recover(&dirs, &["--wait", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
    assert!(stderr.contains(&format!("pid {} (run) holds", agent.pid())), "{stderr}");
    let dry = recover(&dirs, &["--dry-run"]);
    assert!(dry.status.success());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("(run) holds the lock"));

    agent.kill9();
    let after = recover(&dirs, &["--wait", "5"]);
    assert!(after.status.success(), "the lock dies with its holder");
}

#[tokio::test(flavor = "multi_thread")]
async fn recover_returns_a_gpu_a_crash_left_on_vfio_pci() {
    use crate::support::kernel::SimKernel;
    use crate::support::sysfs::FakeSysfs;
    let gpu = "0000:65:00.0";
    let fake =
        FakeSysfs::new().driver_available("vfio-pci").gpu(gpu, 0x2684).driver("nvidia").group(3);
    let _kernel = SimKernel::start(&fake, &[]);
    let dirs = Dirs::new();
    // What a crashed agent leaves: the GPU bound for an instance that has no record.
    let vfio = Vfio::new(fake.root(), &dirs.data);
    vfio.bind("ghost", &[gpu.parse().unwrap()]).unwrap();
    assert_eq!(fake.driver_of(gpu).as_deref(), Some("vfio-pci"));
    let with_sysfs = |args: &[&str]| {
        let mut cmd = recover_command(&dirs);
        cmd.env("QUDATA_SYSFS_ROOT", fake.path()).args(args);
        cmd.output().unwrap()
    };

    let planned = rows(&with_sysfs(&["--dry-run", "--json"]));
    assert_eq!(row(&planned, gpu)["action"], "returned");
    assert_eq!(fake.driver_of(gpu).as_deref(), Some("vfio-pci"), "a dry run changes nothing");
    let done = rows(&with_sysfs(&["--json"]));
    let returned = row(&done, gpu);
    assert_eq!(returned["why"], "bound for instance ghost, which has no live VM", "{returned}");
    assert!(returned.get("failed").is_none(), "{returned}");
    assert_eq!(fake.driver_of(gpu).as_deref(), Some("nvidia"));
    assert!(!dirs.data.join("vfio/ghost.json").exists());
}

/// Host maintenance: `recover --stop-all` stops the recorded instance's QEMU and frpc, keeps
/// the record (now `error`, saying why) and the disk, and touches nothing that is not ours.
#[tokio::test]
async fn stop_all_stops_live_instances_and_frpc_and_keeps_their_disks() {
    use crate::support::frpc::{TEST_TOKEN, creds, standin};
    use qudata_agent::tunnel::{Backoff, TunnelSettings, Tunnels};

    let dirs = Dirs::new();
    let mut live = orphan(&dirs.data, &dirs.run, "live-1");
    store_record(&dirs.data, "live-1", Status::Running, false);
    let disk = live.paths.as_ref().unwrap().overlay.clone();
    let mut stranger = foreign(&dirs.root.path().join("elsewhere"), "not-ours");
    // frpc as an agent leaves it when it stops: running on, found by pidfile and cmdline.
    let settings = TunnelSettings {
        frpc_binary: standin(),
        config_path: dirs.root.path().join("etc/frpc.toml"),
        run_dir: dirs.run.clone(),
        agent_id: "3f1c1b2e-8a4d-4c3e-9b7a-0d5e6f7a8b9c".into(),
        agent_port: 18123,
        backoff: Backoff::PRODUCTION,
        ready_timeout: Duration::from_secs(10),
    };
    let tunnels = Tunnels::start(settings, Ok(creds(TEST_TOKEN))).await.unwrap();
    let frpc = tunnels.frpc_pid().await.expect("frpc runs");
    drop(tunnels);
    let stop_all = |args: &[&str]| {
        recover_command(&dirs)
            .env("QUDATA_FRPC_BINARY", standin())
            .arg("--stop-all")
            .args(args)
            .output()
            .unwrap()
    };

    let planned = rows(&stop_all(&["--dry-run", "--json"]));
    let instance = row(&planned, "instance live-1");
    assert_eq!(instance["action"], "stopped", "{instance}");
    assert_eq!(row(&planned, &format!("QEMU pid {}", live.pid()))["action"], "stopped");
    assert_eq!(row(&planned, &format!("frpc pid {frpc}"))["action"], "stopped");
    assert!(live.alive() && running(frpc), "a dry run stopped something");

    let done = rows(&stop_all(&["--json"]));
    assert!(done.iter().all(|r| r.get("failed").is_none()), "{done:#?}");
    assert!(!live.alive(), "the instance's QEMU is stopped");
    let what = format!("frpc {frpc} to exit");
    wait_until_blocking(what, Duration::from_secs(30), Duration::from_millis(50), || {
        !running(frpc)
    });
    assert!(stranger.alive(), "a QEMU not ours was touched");
    let rec = crate::support::vm::record(&dirs, "live-1");
    assert_eq!(rec["status"], "error");
    assert!(rec["error"].as_str().unwrap().contains("stopped for host maintenance"), "{rec}");
    assert!(disk.exists(), "the disk is kept");

    // Idempotent: a second run has nothing left to stop.
    let again = rows(&stop_all(&["--json"]));
    let acted: Vec<&Value> = again.iter().filter(|r| r["action"] != "kept").collect();
    assert!(acted.is_empty(), "{acted:#?}");
}

/// Alive and not a zombie (frpc here is the test's own child until tokio reaps it).
fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}
