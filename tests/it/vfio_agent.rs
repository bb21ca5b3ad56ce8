//! GPUs through the real agent binary: a simulated kernel behind `QUDATA_SYSFS_ROOT`, a real
//! QEMU (which cannot open /dev/vfio here, so a create with GPUs fails at start), and a real
//! `kill -9` in the middle of a bind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::agent::{Agent, Api, Dirs, free_port, local_secret};
use crate::support::kernel::SimKernel;
use crate::support::sysfs::{CLASS_AUDIO, FakeSysfs};
use crate::support::vm::{leftovers, wait_gone, wait_status};
use crate::support::wait::wait_until_blocking;

const GPU: &str = "0000:65:00.0";
const AUDIO: &str = "0000:65:00.1";

/// A card with an HDMI audio function, each on its host driver, in one IOMMU group.
fn card() -> FakeSysfs {
    FakeSysfs::new()
        .driver_available("vfio-pci")
        .gpu(GPU, 0x2684)
        .driver("nvidia")
        .group(12)
        .bars(&[(0, 16 << 20, false), (1, 32 << 30, true), (3, 32 << 20, true)])
        .function(AUDIO, CLASS_AUDIO)
        .driver("snd_hda_intel")
        .group(12)
}

fn start(dirs: &Dirs, fake: &FakeSysfs, port: u16) -> Agent {
    let env = [
        ("QUDATA_SYSFS_ROOT", fake.path().display().to_string()),
        ("QUDATA_BASE_IMAGE", dirs.unbootable_base_image()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
    ];
    Agent::start(dirs, &["run", "--local"], &env, port)
}

/// (driver, driver_override) of the GPU and its audio function.
fn state(fake: &FakeSysfs) -> Vec<(Option<String>, String)> {
    [GPU, AUDIO].iter().map(|d| (fake.driver_of(d), fake.override_of(d))).collect()
}

fn original() -> Vec<(Option<String>, String)> {
    vec![(Some("nvidia".into()), "(null)".into()), (Some("snd_hda_intel".into()), "(null)".into())]
}

fn bind_records(dirs: &Dirs) -> Vec<String> {
    std::fs::read_dir(dirs.data.join("vfio"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Whether this process may raise RLIMIT_MEMLOCK past its hard limit (CAP_SYS_RESOURCE).
fn may_raise_memlock() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap();
    u64::from_str_radix(cap_eff.trim(), 16).unwrap() & (1 << 24) != 0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_create_returns_every_gpu_to_its_driver_and_leaves_nothing() {
    let fake = card();
    let kernel = SimKernel::start(&fake, &[]);
    let dirs = Dirs::new();
    let mut agent = start(&dirs, &fake, free_port());
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));

    let too_many = api.json("POST", "/instances", &json!({"gpus": 2, "memory": "256M"})).await;
    assert_eq!(too_many.status, 409, "{:?}", too_many.body);
    assert_eq!(too_many.body["error"], "2 GPU(s) requested but 1 free on this host");

    let created = api.json("POST", "/instances", &json!({"gpus": 1, "memory": "256M"})).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();
    let failed = wait_status(&api, "error", Duration::from_secs(120)).await;
    let error = failed["error"].as_str().unwrap();
    // Here QEMU's locked-memory limit cannot be raised without CAP_SYS_RESOURCE; where it
    // can, QEMU itself fails on the simulated device (no /dev/vfio).
    let expected = if may_raise_memlock() { "QEMU" } else { "RLIMIT_MEMLOCK" };
    assert!(error.contains(expected), "{error}");
    assert_eq!(failed["gpus"], 1);

    let log = kernel.log();
    for line in [
        format!("bind {GPU} vfio-pci"),
        format!("bind {AUDIO} vfio-pci"),
        format!("bind {GPU} nvidia"),
        format!("bind {AUDIO} snd_hda_intel"),
    ] {
        assert!(log.contains(&line), "{line} missing from the kernel log {log:?}");
    }
    assert_eq!(state(&fake), original());
    assert!(bind_records(&dirs).is_empty(), "{:?}", bind_records(&dirs));
    let files = leftovers(&dirs, &id);
    assert_eq!(files.len(), 1, "only the instance record (error state) is left: {files:?}");

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(60)).await;
    assert_eq!(state(&fake), original());
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_in_the_middle_of_a_bind_is_undone_at_the_next_start() {
    let fake = card();
    let kernel = SimKernel::start(&fake, &[]);
    // The audio function's unbind hangs: the agent stops between two writes.
    kernel.hang("bus/pci/drivers/snd_hda_intel/unbind");
    let dirs = Dirs::new();
    let port = free_port();
    let mut agent = start(&dirs, &fake, port);
    agent.wait_ready().await;
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let created = api.json("POST", "/instances", &json!({"gpus": 1, "memory": "256M"})).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["data"]["id"].as_str().unwrap().to_owned();

    kernel.wait_log(&format!("bind {GPU} vfio-pci"));
    let what = "the audio function's driver_override to be vfio-pci";
    wait_until_blocking(what, Duration::from_secs(60), Duration::from_millis(10), || {
        let now = fake.override_of(AUDIO);
        if now == "vfio-pci" { Ok(()) } else { Err(now) }
    });
    agent.kill9();
    kernel.unhang("bus/pci/drivers/snd_hda_intel/unbind");
    let half = vec![
        (Some("vfio-pci".into()), "vfio-pci".into()),
        (Some("snd_hda_intel".into()), "vfio-pci".into()),
    ];
    assert_eq!(state(&fake), half);
    assert_eq!(bind_records(&dirs), [format!("{id}.json")]);

    // The next agent undoes the bind before it serves.
    let mut agent = start(&dirs, &fake, port);
    agent.wait_ready().await;
    assert_eq!(state(&fake), original(), "kernel log: {:?}", kernel.log());
    assert!(bind_records(&dirs).is_empty());
    let api = Api::new(&agent, Some(&local_secret(&dirs)));
    let status = wait_status(&api, "error", Duration::from_secs(30)).await;
    assert!(status["error"].as_str().unwrap().contains("the agent stopped"), "{status}");

    assert_eq!(api.call("DELETE", "/instances", None).await.status, 200);
    wait_gone(&dirs, &id, Duration::from_secs(60)).await;
    assert_eq!(state(&fake), original());
    agent.terminate();
}

#[test]
fn a_listed_gpu_that_is_not_there_stops_the_agent_with_status_2() {
    let fake = card();
    let dirs = Dirs::new();
    for (addrs, problem) in [
        ("0000:99:00.0", "0000:99:00.0: no such PCI device"),
        (AUDIO, "0000:65:00.1: vendor 10de class 040300 is not an NVIDIA GPU"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_qudata-agent"))
            .args(["run", "--local"])
            .env_clear()
            .env("QUDATA_DATA_DIR", &dirs.data)
            .env("QUDATA_RUN_DIR", &dirs.run)
            .env("QUDATA_SYSFS_ROOT", fake.path())
            .env("QUDATA_GPU_PCI_ADDRS", addrs)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("qudata-agent: QUDATA_GPU_PCI_ADDRS="), "{stderr}");
        assert!(stderr.contains(problem) && stderr.contains("accepted: "), "{stderr}");
    }
    assert!(!Path::new(&dirs.data).join("instances").exists(), "nothing started");
}

/// The passthrough argv as the real QEMU reads it: every option parses, and QEMU gets as far
/// as opening the host device, which is where a machine without VFIO stops it.
#[tokio::test]
async fn real_qemu_accepts_the_passthrough_argv_up_to_the_host_device() {
    use qudata_agent::backend::qemu::accel::Accel;
    use qudata_agent::backend::qemu::argv::{GpuPassthrough, VmPlan, qemu_argv};
    use qudata_agent::backend::qemu::{disk, process};

    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);
    let dirs = Dirs::new();
    let overlay = dirs.unbootable_base_image();
    std::fs::write(file("seed.img"), vec![0u8; 1 << 20]).unwrap();
    let ovmf = disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap();
    disk::copy_vars(&ovmf.vars_template, &file("vars.fd")).unwrap();
    let plan = VmPlan {
        id: "argv".into(),
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 256,
        ovmf_code: ovmf.code,
        ovmf_vars: file("vars.fd"),
        overlay: overlay.into(),
        seed: file("seed.img"),
        nic: None,
        qmp_socket: file("qmp.sock"),
        qmp_fd: None,
        pidfile: file("qemu.pid"),
        serial_log: file("serial.log"),
        gpus: vec![GpuPassthrough {
            functions: vec![GPU.into(), AUDIO.into()],
            bar_bytes: 32 << 30,
        }],
        topology: qudata_agent::backend::qemu::topology::Topology::unplaced(1, 256),
        disk_io: qudata_agent::backend::qemu::diskio::DiskIo::CACHED,
    };
    let log = file("qemu.log");
    let qemu = process::spawn(Path::new("qemu-system-x86_64"), &qemu_argv(&plan), &log).unwrap();
    let status = qemu.wait_exit(Duration::from_secs(60)).await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.contains("exit status: 0"), "{status}: {text}");
    let first = text.lines().next().unwrap_or_default();
    // The first error is the GPU's own device: the CPU, fw_cfg and root port were accepted.
    let device = "-device vfio-pci,host=0000:65:00.0,bus=gpu0,addr=00.0,multifunction=on:";
    assert!(first.contains(device), "{text}");
    assert!(!text.contains("Invalid parameter") && !text.contains("not found"), "{text}");
}

/// `qudata-agent recover` returns GPUs a bind record holds for no live instance, with the
/// audio function bound alongside, through the same release as the agent.
#[test]
fn recover_returns_the_gpus_of_a_stale_bind_record() {
    use qudata_agent::vfio::{SysfsRoot, Timeouts, Vfio};

    let fake = card();
    let _kernel = SimKernel::start(&fake, &[]);
    let dirs = Dirs::new();
    let vfio = Vfio {
        sysfs: SysfsRoot::new(fake.path()),
        proc_root: "/proc".into(),
        record_dir: qudata_agent::vfio::record_dir(&dirs.data),
        quarantine: qudata_agent::vfio::Quarantine::new(&dirs.data),
        timeouts: Timeouts::default(),
    };
    vfio.bind("gone", &[GPU.parse().unwrap()]).unwrap();
    assert_eq!(fake.driver_of(AUDIO).as_deref(), Some("vfio-pci"));

    let run = |args: &[&str]| {
        crate::support::agent::recover_command(&dirs)
            .args(args)
            .env("QUDATA_SYSFS_ROOT", fake.path())
            .output()
            .unwrap()
    };
    let planned = run(&["--dry-run", "--json"]);
    assert!(planned.status.success(), "{}", String::from_utf8_lossy(&planned.stderr));
    let report: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let gpu_rows: Vec<&serde_json::Value> = rows.iter().filter(|r| r["subject"] == "gpu").collect();
    assert_eq!(gpu_rows.len(), 1, "the GPU only, not its audio function: {rows:?}");
    assert_eq!(gpu_rows[0]["action"], "returned", "{rows:?}");
    assert_eq!(fake.driver_of(GPU).as_deref(), Some("vfio-pci"), "a dry run changes nothing");

    let done = run(&["--json"]);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(state(&fake), original());
    assert!(bind_records(&dirs).is_empty());
}
