//! GPU health: quarantine after a failed reset between tenants, a device off the bus or gone,
//! Xid errors in the kernel log; the 409 on create, `doctor`, `recover --json`, the control
//! plane's `gpu_health`, restarts, and `qudata-agent gpu release-quarantine`. Against the
//! simulated kernel (tests/support/kernel.rs) and a fake kernel log in `/dev/kmsg`'s format.

use std::io::Write;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use qudata_agent::gpu::health::{Health, HealthView};
use qudata_agent::gpu::kmsg;
use qudata_agent::vfio::quarantine::Cleared;
use qudata_agent::vfio::{PciAddress, Quarantine, Timeouts, Vfio};
use serde_json::{Value, json};

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::kernel::SimKernel;
use crate::support::mock_cp::{Behaviour, MockCp, Recorded, api_key, ok_stats};
use crate::support::sysfs::{CLASS_3D, CLASS_AUDIO, FakeSysfs};
use crate::support::vm::{wait_gone, wait_status};

const GPU: &str = "0000:65:00.0";
const AUDIO: &str = "0000:65:00.1";
const OTHER: &str = "0000:b3:00.0";
const WAIT: Duration = Duration::from_secs(60);

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn h100(fake: FakeSysfs, address: &str, group: u32) -> FakeSysfs {
    fake.device(address, 0x10de, 0x2330, CLASS_3D)
        .driver("nvidia")
        .group(group)
        .resettable("flr bus")
}

/// An Xid record as the NVIDIA driver logs it, at `micros` since boot.
fn xid(slot: &str, xid: u32, micros: u64) -> String {
    format!("3,812,{micros},-;NVRM: Xid (PCI:{slot}): {xid}, pid=1234, name=python3, details\n")
}

#[test]
fn health_follows_the_bus_and_the_kernel_log() {
    let fake = h100(h100(FakeSysfs::new().driver_available("vfio-pci"), GPU, 12), OTHER, 13);
    let fake = fake.device("0000:ca:00.0", 0x10de, 0x2330, CLASS_3D).driver("nvidia").group(14);
    let dir = tempfile::tempdir().unwrap();
    let vfio = Arc::new(Vfio {
        sysfs: fake.root(),
        proc_root: dir.path().join("proc"),
        record_dir: dir.path().join("vfio"),
        quarantine: Quarantine::new(dir.path()),
        timeouts: Timeouts::default(),
    });
    let offered = vec![addr(GPU), addr(OTHER), addr("0000:ca:00.0")];
    let view = HealthView::new(vfio, offered, None);
    let states = |view: &HealthView| view.report().iter().map(|h| h.health).collect::<Vec<_>>();
    assert_eq!(states(&view), [Health::Healthy; 3]);
    assert!(view.unavailable().is_empty());

    fake.vanish("0000:ca:00.0");
    fake.off_the_bus(OTHER);
    view.check_bus();
    let report = view.report();
    assert_eq!(states(&view), [Health::Healthy, Health::Quarantined, Health::Lost]);
    assert!(report[1].reason.as_deref().unwrap().contains("reads all ones"), "{report:?}");
    assert!(report[1].since.is_some());
    assert!(report[2].reason.as_deref().unwrap().contains("gone from the PCI bus"));

    // An Xid for the first GPU; a program's fault (13) is not the GPU's.
    let fault = kmsg::parse_record(xid("0000:65:00", 13, 5_000).trim_end());
    assert_eq!(fault, None);
    let event = kmsg::parse_record(xid("0000:65:00", 79, 5_000).trim_end()).unwrap();
    view.note(&event, "boot-1");
    assert_eq!(view.report()[0].health, Health::Quarantined);
    let why = view.unavailable();
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(why[0].1.contains("Xid 79 (GPU has fallen off the bus)"), "{why:?}");
    assert!(why[0].1.contains("qudata-agent gpu release-quarantine 0000:65:00.0"), "{why:?}");

    // Released by the operator after the line: the same line is old news in this boot, but a
    // later one (or the same time in another boot) counts.
    let cleared = Cleared { boot_id: "boot-1".into(), log_micros: 6_000 };
    view.vfio.release_quarantine(&addr(GPU), cleared).unwrap().unwrap();
    view.note(&event, "boot-1");
    assert_eq!(view.report()[0].health, Health::Healthy);
    view.note(&kmsg::GpuEvent { micros: 7_000, ..event.clone() }, "boot-1");
    assert_eq!(view.report()[0].health, Health::Quarantined);
}

/// The GPU (resettable) and its HDMI audio function in one group, on their host drivers.
fn card() -> FakeSysfs {
    h100(FakeSysfs::new().driver_available("vfio-pci"), GPU, 12)
        .function(AUDIO, CLASS_AUDIO)
        .driver("snd_hda_intel")
        .group(12)
        .resettable("flr")
}

fn start_local(dirs: &Dirs, fake: &FakeSysfs, port: u16) -> Agent {
    let env = [
        ("QUDATA_SYSFS_ROOT", fake.path().display().to_string()),
        ("QUDATA_BASE_IMAGE", dirs.unbootable_base_image()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
    ];
    Agent::start(dirs, &["run", "--local"], &env, port)
}

/// The agent binary's `args` on the test's dirs and simulated sysfs.
fn command(dirs: &Dirs, fake: &FakeSysfs, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qudata-agent"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("QUDATA_DATA_DIR", &dirs.data)
        .env("QUDATA_RUN_DIR", &dirs.run)
        .env("QUDATA_SYSFS_ROOT", fake.path())
        .env("QUDATA_FRPC_CONFIG", dirs.root.path().join("etc/frpc.toml"))
        .envs(dirs.net.env())
        .output()
        .expect("run qudata-agent")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A create with the GPU whose VM cannot start here (no /dev/vfio): the GPU is released,
/// which resets it first.
async fn failed_create(api: &Api) -> String {
    let created = api.json("POST", "/instances", &json!({"gpus": 1, "memory": "256M"})).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    wait_status(api, "error", Duration::from_secs(120)).await;
    created.body["data"]["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_whose_reset_fails_is_quarantined_across_restarts_until_released() {
    let fake = card();
    let kernel = SimKernel::start(&fake, &[]);
    kernel.fail_reset(GPU);
    let dirs = Dirs::new();
    let port = free_port();
    let mut agent = start_local(&dirs, &fake, port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));

    let id = failed_create(&api).await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, WAIT).await;
    // Kept on vfio-pci, whole slot: no host driver probes a GPU that failed its reset.
    assert_eq!(fake.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(fake.driver_of(AUDIO).as_deref(), Some("vfio-pci"));

    let refused = api.json("POST", "/instances", &json!({"gpus": 1, "memory": "256M"})).await;
    assert_eq!(refused.status, 409, "{:?}", refused.body);
    let error = refused.body["error"].as_str().unwrap();
    assert!(
        error.starts_with(
            "1 GPU(s) requested but 0 free on this host; GPU 0000:65:00.0 is quarantined since"
        ),
        "{error}"
    );
    assert!(error.contains("reset between tenants failed"), "{error}");

    // Survives a restart (whose retry of the reset fails again).
    agent.terminate();
    let mut agent = start_local(&dirs, &fake, port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let refused = api.json("POST", "/instances", &json!({"gpus": 1, "memory": "256M"})).await;
    assert_eq!(refused.status, 409, "{:?}", refused.body);

    let doctor = command(&dirs, &fake, &["doctor", "--json"]);
    let checks: Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let line = checks.as_array().unwrap().iter().find(|c| c["check"] == "gpu").unwrap();
    assert_eq!(line["status"], "fail", "{line}");
    assert!(line["detail"].as_str().unwrap().contains("quarantined since"), "{line}");
    assert!(line["fix"].as_str().unwrap().contains("release-quarantine 0000:65:00.0"), "{line}");

    let health = command(&dirs, &fake, &["gpu", "health", "--json"]);
    assert!(health.status.success(), "{}", text(&health));
    let health: Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(health[0]["pci"], GPU);
    assert_eq!(health[0]["health"], "quarantined");

    let listed = command(&dirs, &fake, &["recover", "--dry-run", "--json"]);
    let report: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let row = report["rows"].as_array().unwrap().iter().find(|r| r["action"] == "quarantined");
    let row = row.unwrap_or_else(|| panic!("no quarantined row: {report}"));
    assert_eq!((row["subject"].as_str(), row["name"].as_str()), (Some("gpu"), Some(GPU)));

    // The operator checked it: released, back on its drivers, offered again.
    let released = command(&dirs, &fake, &["gpu", "release-quarantine", GPU]);
    assert!(released.status.success(), "{}", text(&released));
    assert!(text(&released).contains("released from quarantine"), "{}", text(&released));
    assert_eq!(fake.driver_of(GPU).as_deref(), Some("nvidia"));
    assert_eq!(fake.driver_of(AUDIO).as_deref(), Some("snd_hda_intel"));
    let again = command(&dirs, &fake, &["gpu", "release-quarantine", GPU]);
    assert!(
        !again.status.success() && text(&again).contains("is not quarantined"),
        "{}",
        text(&again)
    );

    // With a working reset, the next tenant's release leaves it healthy.
    kernel.heal_reset(GPU);
    let id = failed_create(&api).await;
    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, WAIT).await;
    assert!(kernel.log().contains(&format!("reset {GPU} on vfio-pci")), "{:?}", kernel.log());
    assert_eq!(fake.driver_of(GPU).as_deref(), Some("nvidia"));
    assert!(Quarantine::new(&dirs.data).load().unwrap().gpus.is_empty());
    agent.terminate();
}

/// The first accepted `/stats` body that satisfies `check`.
async fn stats_where(cp: &MockCp, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let found = |r: &[Recorded]| ok_stats(r).into_iter().any(|s| check(&s.body));
    let reqs = cp.until(what, WAIT, found).await;
    ok_stats(&reqs).into_iter().find(|s| check(&s.body)).unwrap().body.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_hears_of_a_quarantine_from_the_kernel_log_and_of_a_lost_gpu() {
    let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
    let fake = h100(h100(FakeSysfs::new().driver_available("vfio-pci"), GPU, 12), OTHER, 13);
    let dirs = Dirs::new();
    // Logged before the agent started: it reads the log from the start.
    std::fs::write(dirs.kmsg(), xid("0000:b3:00", 48, 1_000)).unwrap();
    let mut env = cp.agent_env(&api_key(), 200);
    env.push(("QUDATA_SYSFS_ROOT", fake.path().display().to_string()));
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;

    let reqs = cp.until("/init/host", WAIT, |r| r.iter().any(|r| r.path == "/init/host")).await;
    let host = &reqs.iter().find(|r| r.path == "/init/host").unwrap().body;
    assert_eq!(host["gpu_health"].as_array().unwrap().len(), 2, "{host}");
    let quarantined = |s: &Value, i: usize| s["gpu_health"][i]["health"] == "quarantined";
    let body = stats_where(&cp, "the Xid 48 quarantine in /stats", |s| quarantined(s, 1)).await;
    assert_eq!(body["gpu_health"][1]["pci"], OTHER);
    let reason = body["gpu_health"][1]["reason"].as_str().unwrap();
    assert_eq!(reason, "the kernel logged Xid 48 (double-bit ECC error)");
    assert_eq!(body["gpu_health"][0]["health"], "healthy", "{body}");

    // Logged while it runs.
    let mut log = std::fs::OpenOptions::new().append(true).open(dirs.kmsg()).unwrap();
    log.write_all(xid("0000:65:00", 95, 2_000).as_bytes()).unwrap();
    let body = stats_where(&cp, "the Xid 95 quarantine", |s| quarantined(s, 0)).await;
    assert!(body["gpu_health"][0]["reason"].as_str().unwrap().contains("Xid 95"), "{body}");

    fake.vanish(OTHER);
    let body = stats_where(&cp, "a lost GPU", |s| s["gpu_health"][1]["health"] == "lost").await;
    assert!(body["gpu_health"][1]["reason"].as_str().unwrap().contains("gone from the PCI bus"));
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn nvml_row_remapping_failures_quarantine_a_gpu_on_the_host_driver() {
    use crate::support::nvml::{FakeDriver, fake_library, h100 as nvml_h100};
    let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
    let fake = h100(h100(FakeSysfs::new().driver_available("vfio-pci"), GPU, 12), OTHER, 13);
    let dirs = Dirs::new();
    let config = dirs.root.path().join("fake-nvml.conf");
    let driver = FakeDriver {
        cuda: 12040,
        gpus: vec![nvml_h100(0, 30, 0, None), nvml_h100(0, 30, 0, None)],
        // 0000:65:00.0 is fine; 0000:b3:00.0 had a row remapping fail.
        health: vec![(0, 0x65, false, false, false), (1, 0xb3, false, false, true)],
        ..Default::default()
    };
    driver.write(&config);
    let mut env = cp.agent_env(&api_key(), 200);
    env.push(("QUDATA_SYSFS_ROOT", fake.path().display().to_string()));
    env.push(("QUDATA_NVML_LIBRARY", fake_library().display().to_string()));
    env.push(("FAKE_NVML_CONFIG", config.display().to_string()));
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    let body =
        stats_where(&cp, "the NVML quarantine", |s| s["gpu_health"][1]["health"] == "quarantined")
            .await;
    let reason = body["gpu_health"][1]["reason"].as_str().unwrap();
    assert_eq!(reason, "NVML reports a row remapping failed (uncorrectable memory)");
    assert_eq!(body["gpu_health"][0]["health"], "healthy", "{body}");
    agent.terminate();
}
