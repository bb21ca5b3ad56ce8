//! The host's NVML and VFIO binding through the real binary: NVML (the fake
//! `libnvidia-ml.so.1`) is shut down before the agent binds a GPU to vfio-pci (the NVIDIA
//! driver cannot let go of a GPU whose device node a process holds open), opened again after
//! the bind, and reopened after the GPU went back to its driver. The simulated kernel stands
//! behind `QUDATA_SYSFS_ROOT`; QEMU cannot open /dev/vfio here, so the create fails at start
//! and is rolled back, which exercises bind and release both.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::agent::{Agent, Api, Dirs, free_port};
use crate::support::kernel::SimKernel;
use crate::support::mock_cp::{Behaviour, MockCp, api_key, ok_stats};
use crate::support::nvml::{FakeDriver, fake_library, h100};
use crate::support::sysfs::FakeSysfs;
use crate::support::vm::wait_status;

const GPU: &str = "0000:65:00.0";
const WAIT: Duration = Duration::from_secs(120);

fn events(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn nvml_is_closed_while_a_gpu_is_bound_and_reopened_after() {
    let fake =
        FakeSysfs::new().driver_available("vfio-pci").gpu(GPU, 0x2330).driver("nvidia").group(12);
    let _kernel = SimKernel::start(&fake, &[]);
    let cp =
        MockCp::start(Behaviour { host_exists: true, without_frp: true, ..Default::default() });
    let dirs = Dirs::new();
    let base = dirs.root.path().join("base.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .unwrap();
    assert!(made.success());
    let config = dirs.root.path().join("fake-nvml.conf");
    let log = dirs.root.path().join("fake-nvml.log");
    FakeDriver { cuda: 12040, gpus: vec![h100(5, 40, 100, Some(90_000))], ..Default::default() }
        .write(&config);

    let mut env = cp.agent_env(&api_key(), 200);
    env.extend([
        ("QUDATA_SYSFS_ROOT", fake.path().display().to_string()),
        ("QUDATA_BASE_IMAGE", base.display().to_string()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
        ("QUDATA_NVML_LIBRARY", fake_library().display().to_string()),
        ("FAKE_NVML_CONFIG", config.display().to_string()),
        ("FAKE_NVML_LOG", log.display().to_string()),
    ]);
    let mut agent = Agent::start(&dirs, &["run"], &env, free_port());
    agent.wait_ready().await;
    cp.until("NVML values in /stats", WAIT, |r| {
        ok_stats(r).iter().any(|s| s.body["gpu_util"] == 5.0)
    })
    .await;
    assert_eq!(events(&log), ["init"], "NVML opened once at start");

    let api = Api::new(&agent, Some(&cp.only_secret()));
    let created = api.json("POST", "/instances", &json!({"gpus": 1, "memory": "256M"})).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    wait_status(&api, "error", WAIT).await;

    // Closed before the bind, opened after it, and again after the GPU came back.
    assert_eq!(
        events(&log),
        ["init", "shutdown", "init", "shutdown", "init"],
        "{}",
        agent.output()
    );
    let output = agent.output();
    let closed = output.find("NVML closed while GPUs are bound").expect("closing is logged");
    let bound = output.find("devices bound to vfio-pci").expect("the bind is logged");
    assert!(closed < bound, "NVML closed before the bind:\n{output}");
    // The stats loop goes on with the driver's GPU again.
    let after = cp.requests().len();
    cp.until("NVML values after the release", WAIT, |r| {
        ok_stats(&r[after..]).iter().any(|s| s.body["gpus"].is_array())
    })
    .await;
    agent.terminate();
}
