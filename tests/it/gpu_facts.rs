//! GPU facts and metrics of the host: the real binary loading a fake `libnvidia-ml.so.1`
//! (built from C by the test) through nvml-wrapper, its values reaching `/init/host` and
//! `/stats` of the mock control plane; the no-driver path; the self-test inventory file; the
//! PCI-id fallback against a fake sysfs.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use qudata_agent::gpu::GpuFacts;
use qudata_agent::gpu::facts::{FactsInputs, FactsSource, host_facts};
use serde_json::Value;

use crate::support::agent::{Agent, Dirs, free_port};
use crate::support::mock_cp::{Behaviour, MockCp, Recorded, api_key, ok_stats};
use crate::support::nvml::{FakeDriver, fake_library, h100};
use crate::support::sysfs::{CLASS_3D, CLASS_AUDIO, FakeSysfs};

const WAIT: Duration = Duration::from_secs(60);

/// The agent against the mock, with an empty simulated sysfs (no GPU by PCI id, whatever the
/// machine running the test has).
fn start(dirs: &Dirs, cp: &MockCp, extra: &[(&'static str, String)]) -> Agent {
    let sysfs = dirs.root.path().join("sys");
    if !sysfs.exists() {
        for sub in ["bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "module"] {
            std::fs::create_dir_all(sysfs.join(sub)).unwrap();
        }
    }
    let mut env = cp.agent_env(&api_key(), 200);
    env.push(("QUDATA_SYSFS_ROOT", sysfs.display().to_string()));
    env.extend(extra.iter().cloned());
    Agent::start(dirs, &["run"], &env, free_port())
}

async fn init_host(cp: &MockCp) -> Value {
    let reqs = cp.until("/init/host", WAIT, |r| r.iter().any(|r| r.path == "/init/host")).await;
    reqs.into_iter().find(|r| r.path == "/init/host").unwrap().body
}

fn gpu_fields(body: &Value) -> (Value, Value, Value, Value, Value) {
    (
        body["gpu_name"].clone(),
        body["gpu_amount"].clone(),
        body["vram"].clone(),
        body["max_cuda"].clone(),
        body["configuration"]["max_cuda_version"].clone(),
    )
}

/// The first accepted `/stats` body that satisfies `check`.
async fn stats_where(cp: &MockCp, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let found = |r: &[Recorded]| ok_stats(r).into_iter().any(|s| check(&s.body));
    let reqs = cp.until(what, WAIT, found).await;
    ok_stats(&reqs).into_iter().find(|s| check(&s.body)).unwrap().body.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn nvml_values_reach_init_host_and_stats() {
    let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
    let dirs = Dirs::new();
    let config = dirs.root.path().join("fake-nvml.conf");
    let mut driver = FakeDriver {
        cuda: 12040,
        gpus: vec![h100(97, 71, 40000, Some(612_530)), h100(3, 35, 0, None)],
        ..Default::default()
    };
    driver.write(&config);
    let env = [
        ("QUDATA_NVML_LIBRARY", fake_library().display().to_string()),
        ("FAKE_NVML_CONFIG", config.display().to_string()),
    ];
    let mut agent = start(&dirs, &cp, &env);
    agent.wait_ready().await;

    let body = init_host(&cp).await;
    assert_eq!(
        gpu_fields(&body),
        ("H10080GBHBM3".into(), 2.into(), 79.65.into(), 12.4.into(), 12.4.into()),
        "{body}"
    );

    let stats = stats_where(&cp, "GPU stats", |b| b["gpus"].is_array()).await;
    assert_eq!((stats["gpu_util"].as_f64(), stats["gpu_temp"].as_i64()), (Some(97.0), Some(71)));
    assert_eq!(stats["mem_util"], 49.04, "40000 of 81559 MiB: {stats}");
    assert_eq!(
        stats["gpus"],
        serde_json::json!([
            {"index": 0, "util": 97.0, "temp": 71, "mem_used_mib": 40000, "mem_total_mib": 81559, "power_w": 612.53},
            {"index": 1, "util": 3.0, "temp": 35, "mem_used_mib": 0, "mem_total_mib": 81559, "power_w": 0.0}
        ])
    );

    // Every sample asks the driver again: a change shows in a later sample.
    driver.gpus[0] = h100(12, 64, 8000, Some(250_000));
    driver.write(&config);
    let later = stats_where(&cp, "the new values", |b| b["gpu_util"] == 12.0).await;
    assert_eq!(
        (later["gpu_temp"].as_i64(), later["gpus"][0]["power_w"].as_f64()),
        (Some(64), Some(250.0))
    );
    assert!(agent.output().contains("NVML loaded"), "{}", agent.output());
}

/// With no driver (the default library name, absent here) or a driver whose init fails, the
/// agent registers and reports: GPU fields empty, one log line, no error.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_driver_gpu_fields_are_empty_and_said_once() {
    for failing_init in [false, true] {
        let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
        let dirs = Dirs::new();
        let mut env = Vec::new();
        if failing_init {
            let config = dirs.root.path().join("fake-nvml.conf");
            FakeDriver { fail_init: true, ..Default::default() }.write(&config);
            env.push(("QUDATA_NVML_LIBRARY", fake_library().display().to_string()));
            env.push(("FAKE_NVML_CONFIG", config.display().to_string()));
        }
        let mut agent = start(&dirs, &cp, &env);
        agent.wait_ready().await;
        let body = init_host(&cp).await;
        assert_eq!(
            gpu_fields(&body),
            ("".into(), 0.into(), 0.0.into(), 0.0.into(), 0.0.into()),
            "{body}"
        );
        cp.until("three samples", WAIT, |r| ok_stats(r).len() >= 3).await;
        for s in ok_stats(&cp.requests()) {
            assert!(s.body.get("gpus").is_none(), "{}", s.body);
            assert_eq!(
                (s.body["gpu_util"].as_f64(), s.body["gpu_temp"].as_i64()),
                (Some(0.0), Some(0))
            );
        }
        let output = agent.output();
        assert_eq!(output.matches("no NVIDIA driver on the host").count(), 1, "{output}");
        let nvml_lines = output.lines().filter(|l| l.contains("NVML"));
        assert!(nvml_lines.clone().all(|l| !l.contains("ERROR")), "{output}");
        if failing_init {
            assert!(
                output.contains("NVIDIA driver is not loaded"),
                "the reason is named: {output}"
            );
        }
    }
}

/// GPUs on vfio-pci: the host has no driver, the self-test's inventory file gives the facts.
#[tokio::test(flavor = "multi_thread")]
async fn the_self_test_inventory_gives_facts_without_a_driver() {
    let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
    let dirs = Dirs::new();
    std::fs::create_dir_all(&dirs.data).unwrap();
    std::fs::set_permissions(&dirs.data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let file = dirs.data.join("gpu-inventory.json");
    std::fs::write(&file, inventory_json(&["0000:65:00.0", "0000:b3:00.0"])).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut agent = start(&dirs, &cp, &[]);
    agent.wait_ready().await;
    let body = init_host(&cp).await;
    assert_eq!(
        gpu_fields(&body),
        ("L40S".into(), 2.into(), 44.99.into(), 12.2.into(), 12.2.into()),
        "{body}"
    );
}

/// The file `qudata-agent selftest` wrote while the driver owned the GPUs feeds `/init/host`
/// once the driver is gone (the GPUs moved to vfio-pci).
#[tokio::test(flavor = "multi_thread")]
async fn the_inventory_the_selftest_wrote_gives_facts_without_a_driver() {
    let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
    let dirs = Dirs::new();
    let config = dirs.root.path().join("fake-nvml.conf");
    let driver = FakeDriver {
        cuda: 12040,
        gpus: vec![h100(0, 30, 0, None), h100(0, 30, 0, None)],
        ..Default::default()
    };
    driver.write(&config);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qudata-agent"))
        .arg("selftest")
        .env_clear()
        .env("QUDATA_DATA_DIR", &dirs.data)
        .env("QUDATA_KMSG_PATH", dirs.kmsg())
        .env("QUDATA_NVML_LIBRARY", fake_library())
        .env("FAKE_NVML_CONFIG", &config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let mut agent = start(&dirs, &cp, &[]);
    agent.wait_ready().await;
    let body = init_host(&cp).await;
    assert_eq!(
        gpu_fields(&body),
        ("H10080GBHBM3".into(), 2.into(), 79.65.into(), 12.4.into(), 12.4.into()),
        "{body}"
    );
    assert!(!agent.output().contains("ignoring the GPU inventory"), "{}", agent.output());
}

fn inventory_json(addresses: &[&str]) -> String {
    let gpus: Vec<Value> = addresses
        .iter()
        .map(|a| serde_json::json!({"pci_address": a, "name": "NVIDIA L40S", "memory_total_mib": 46068}))
        .collect();
    serde_json::json!({"version": 1, "cuda_version": "12.2", "driver_version": "535.104.05", "gpus": gpus})
        .to_string()
}

#[test]
fn sources_in_order_self_test_then_pci_ids() {
    let sysfs = FakeSysfs::new()
        .device("0000:65:00.0", 0x10de, 0x2330, CLASS_3D)
        .driver("vfio-pci")
        .group(12)
        .device("0000:b3:00.0", 0x10de, 0x2330, CLASS_3D)
        .driver("vfio-pci")
        .group(40)
        .function("0000:b3:00.1", CLASS_AUDIO)
        .group(40);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpu-inventory.json");
    let root = sysfs.root();
    let inputs = |only| FactsInputs { nvml: None, selftest_file: &file, sysfs: &root, only };

    // No inventory file: the PCI ids and the model table (no CUDA version from there).
    let h100 =
        GpuFacts { name: "NVIDIA H100 80GB HBM3".into(), count: 2, vram_gib: 80.0, max_cuda: 0.0 };
    assert_eq!(host_facts(&inputs(None)), Some((h100.clone(), FactsSource::PciIds)));
    let one = ["0000:b3:00.0".to_owned()];
    let facts = host_facts(&inputs(Some(&one))).unwrap().0;
    assert_eq!(facts.count, 1, "only the selected GPUs");
    assert_eq!(facts.unknown(), ["max_cuda"]);

    // A self-test inventory wins over PCI ids.
    std::fs::write(&file, inventory_json(&["0000:65:00.0"])).unwrap();
    let (facts, source) = host_facts(&inputs(None)).unwrap();
    assert_eq!(
        (source, facts.name.as_str(), facts.count),
        (FactsSource::SelfTest, "NVIDIA L40S", 1)
    );
    // One that lists none of the selected GPUs, or a broken one, falls back to PCI ids.
    assert_eq!(host_facts(&inputs(Some(&one))).unwrap().1, FactsSource::PciIds);
    std::fs::write(&file, "{\"version\": 7}").unwrap();
    assert_eq!(host_facts(&inputs(None)), Some((h100, FactsSource::PciIds)));

    // A model outside the table: the count is known, name and VRAM are not.
    let odd = FakeSysfs::new().device("0000:01:00.0", 0x10de, 0x0001, CLASS_3D);
    let odd_root = odd.root();
    let missing = dir.path().join("none.json");
    let facts = host_facts(&FactsInputs {
        nvml: None,
        selftest_file: &missing,
        sysfs: &odd_root,
        only: None,
    });
    let facts = facts.unwrap().0;
    assert_eq!((facts.count, facts.name.as_str(), facts.vram_gib), (1, "", 0.0));

    // No GPU at all: nothing.
    let empty = FakeSysfs::new();
    let empty_root = empty.root();
    let none = FactsInputs { nvml: None, selftest_file: &missing, sysfs: &empty_root, only: None };
    assert_eq!(host_facts(&none), None);
}
