//! `qudata-agent doctor`: every check's branches against fake hosts (`doctor/`), and the real
//! binary on this real machine.

mod platform;
mod tools;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use qudata_agent::gpu::Inventory;
use qudata_agent::vfio::SysfsRoot;
use serde_json::Value;

/// The checks the README documents; `gpu` repeats per GPU.
const DOCUMENTED: &[&str] = &[
    "cpu",
    "kvm",
    "iommu",
    "vfio",
    "gpu",
    "nvml",
    "qemu",
    "qemu-img",
    "ovmf",
    "vm-network",
    "host-ports",
    "accel",
    "frpc",
    "frp",
    "docker",
    "datadir",
    "backend",
];

/// Runs the binary with only `PATH` and the given settings (no `QUDATA_API_KEY`).
fn doctor(args: &[&str], env: &[(&str, &str)]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qudata-agent"));
    cmd.arg("doctor")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("QUDATA_DATA_DIR", dir.path().join("data"))
        .env("QUDATA_RUN_DIR", dir.path().join("run"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    (cmd.output().unwrap(), dir)
}

fn json_report(out: &Output) -> Vec<Value> {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::from_str::<Value>(&text).unwrap().as_array().cloned().expect("a JSON array")
}

fn statuses(report: &[Value]) -> Vec<&str> {
    report.iter().map(|c| c["status"].as_str().unwrap()).collect()
}

#[test]
fn json_report_has_every_check_and_exit_status_follows_failures() {
    let (out, _dir) = doctor(&["--json"], &[]);
    let report = json_report(&out);
    for c in &report {
        let mut keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["check", "detail", "fix", "status"], "{c}");
        assert!(["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()), "{c}");
        assert!(c["status"] == "ok" || c["fix"].is_string() || c["check"] == "datadir", "{c}");
    }
    let names: Vec<&str> = report.iter().map(|c| c["check"].as_str().unwrap()).collect();
    for name in DOCUMENTED {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    let failed = statuses(&report).contains(&"fail");
    assert_eq!(out.status.code(), Some(if failed { 1 } else { 0 }), "{report:?}");

    // Cross-check with what this machine's /sys says.
    let gpus = Inventory::scan(&SysfsRoot::default(), None).unwrap().gpus.len();
    assert_eq!(names.iter().filter(|n| **n == "gpu").count(), gpus.max(1));
    let has_groups = SysfsRoot::default().has_iommu_groups().unwrap();
    let iommu = report.iter().find(|c| c["check"] == "iommu").unwrap();
    assert_eq!(iommu["status"] == "ok", has_groups, "{iommu}");
    let datadir = report.iter().find(|c| c["check"] == "datadir").unwrap();
    assert_eq!(datadir["status"], "warn", "a missing data dir is created at first run");
}

#[test]
fn text_report_has_one_aligned_line_per_check() {
    let (json, _dir) = doctor(&["--json"], &[]);
    let report = json_report(&json);
    let (out, _dir) = doctor(&[], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), report.len(), "{text}");
    for (line, c) in lines.iter().zip(&report) {
        let status = c["status"].as_str().unwrap();
        let check = c["check"].as_str().unwrap();
        assert_eq!(&line[..6], format!("{status:<6}"), "{line}");
        assert_eq!(&line[6..17], format!("{check:<11}"), "{line}");
    }
    let failed = lines.iter().any(|l| l.starts_with("fail "));
    assert_eq!(out.status.code(), Some(if failed { 1 } else { 0 }), "{text}");
}

#[test]
fn settings_reach_the_checks() {
    let dir = tempfile::tempdir().unwrap();
    let frpc = dir.path().join("frpc");
    std::fs::write(&frpc, "#!/bin/sh\necho 0.61.0\n").unwrap();
    std::fs::set_permissions(&frpc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    // On a real host 0000:00:00.0 is the host bridge, never an NVIDIA GPU.
    let (out, _d) = doctor(
        &["--json"],
        &[
            ("QUDATA_FRPC_BINARY", frpc.to_str().unwrap()),
            ("QUDATA_DATA_DIR", data.to_str().unwrap()),
            ("QUDATA_GPU_PCI_ADDRS", "0000:00:00.0"),
        ],
    );
    let report = json_report(&out);
    let find = |name: &str| report.iter().find(|c| c["check"] == name).unwrap().clone();
    assert_eq!(find("frpc")["status"], "ok", "{report:?}");
    assert!(find("frpc")["detail"].as_str().unwrap().starts_with("frpc 0.61.0"));
    let datadir = find("datadir");
    let root = owned_by_root(&data);
    assert_eq!(datadir["status"] == "ok", root, "{datadir}");
    let gpu = find("gpu");
    assert_eq!(gpu["status"], "fail", "{gpu}");
    assert_eq!(gpu["fix"], "fix QUDATA_GPU_PCI_ADDRS");
    assert_eq!(out.status.code(), Some(1));
}

/// Without credentials the report says why frpc will not start; the stored ones from `/init`
/// and the overrides make it `ok`, and the token never shows.
#[test]
fn frp_credentials_are_explained_and_the_token_never_shown() {
    let (out, _dir) = doctor(&["--json"], &[]);
    let check = |out: &Output| {
        json_report(out).into_iter().find(|c| c["check"] == "frp").expect("an frp check")
    };
    let missing = check(&out);
    assert_eq!(missing["status"], "warn", "{missing}");
    assert!(missing["detail"].as_str().unwrap().contains("frpc is not started"), "{missing}");
    assert!(missing["fix"].as_str().unwrap().contains("QUDATA_FRP_TOKEN"), "{missing}");

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token = "doctor-stored-token-77";
    let stored = serde_json::json!({"server_addr": "frp.example", "server_port": 7000,
        "token": token, "subdomain": null});
    std::fs::write(data.join("frp.json"), stored.to_string()).unwrap();
    let (out, _d) = doctor(&["--json"], &[("QUDATA_DATA_DIR", data.to_str().unwrap())]);
    let stored = check(&out);
    assert_eq!(stored["status"], "ok", "{stored}");
    assert_eq!(stored["detail"], "server frp.example:7000, token set");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(token));

    let (out, _d) = doctor(
        &[],
        &[
            ("QUDATA_DATA_DIR", data.to_str().unwrap()),
            ("QUDATA_FRP_SERVER", "127.0.0.9"),
            ("QUDATA_FRP_TOKEN", "override-token-88"),
        ],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l[6..].starts_with("frp ")).expect(&text);
    assert!(line.starts_with("ok") && line.contains("127.0.0.9:7000"), "{line}");
    assert!(!text.contains("override-token-88") && !text.contains(token), "{text}");

    std::fs::write(data.join("frp.json"), "{broken").unwrap();
    let (out, _d) = doctor(&["--json"], &[("QUDATA_DATA_DIR", data.to_str().unwrap())]);
    let damaged = check(&out);
    assert_eq!(damaged["status"], "fail", "{damaged}");
    assert!(damaged["detail"].as_str().unwrap().contains("frp.json"), "{damaged}");
}

fn owned_by_root(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().uid() == 0
}

#[test]
fn a_bad_setting_exits_2_and_no_api_key_is_needed() {
    let (out, _dir) = doctor(&[], &[("QUDATA_BACKEND", "xen")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("qudata-agent: QUDATA_BACKEND="), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);

    let (out, _dir) = doctor(&["--help"], &[]);
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("QUDATA_DATA_DIR") && help.contains("QUDATA_GPU_PCI_ADDRS"), "{help}");
    assert!(!help.contains("QUDATA_API_KEY"), "doctor does not read the API key");
}

#[test]
fn doctor_reads_the_sysfs_root_it_is_given() {
    let fake = crate::support::sysfs::FakeSysfs::new()
        .driver_available("vfio-pci")
        .gpu("0000:65:00.0", 0x2330)
        .driver("nvidia")
        .group(12)
        .bars(&[(1, 32 << 30, true), (3, 32 << 20, true)])
        .resettable("flr")
        .function("0000:65:00.1", crate::support::sysfs::CLASS_AUDIO)
        .group(12);
    let root = fake.path().display().to_string();
    let (out, _dir) = doctor(&["--json"], &[("QUDATA_SYSFS_ROOT", &root)]);
    let report = json_report(&out);
    let gpus: Vec<&Value> = report.iter().filter(|c| c["check"] == "gpu").collect();
    assert_eq!(gpus.len(), 1, "{report:?}");
    assert_eq!(
        gpus[0]["detail"],
        "0000:65:00.0 10de:2330 on nvidia, iommu group 12 (peers: 0000:65:00.1), slot also .1, \
         64-bit BARs 32800 MiB; passthrough ready (vfio-pci when a VM starts); between \
         tenants: function reset (flr)"
    );
    let iommu = report.iter().find(|c| c["check"] == "iommu").unwrap();
    assert!(iommu["detail"].as_str().unwrap().starts_with("1 IOMMU group"), "{iommu}");
}

/// The `nvml` line: the fake driver loaded as the agent loads it, against a simulated sysfs
/// with one H100 on the nvidia driver.
#[test]
fn the_nvml_line_compares_the_driver_with_sysfs() {
    use crate::support::nvml::{FakeDriver, fake_library, h100};
    let fake = crate::support::sysfs::FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("nvidia");
    let root = fake.path().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nvml.conf");
    let library = fake_library().display().to_string();
    let nvml_line = |library: &str| {
        let env = [
            ("QUDATA_SYSFS_ROOT", root.as_str()),
            ("QUDATA_NVML_LIBRARY", library),
            ("FAKE_NVML_CONFIG", config.to_str().unwrap()),
        ];
        let report = json_report(&doctor(&["--json"], &env).0);
        report.into_iter().find(|c| c["check"] == "nvml").expect("an nvml line")
    };

    FakeDriver { cuda: 12040, gpus: vec![h100(0, 30, 0, None)], ..Default::default() }
        .write(&config);
    let line = nvml_line(&library);
    assert_eq!(line["status"], "ok", "{line}");
    assert_eq!(
        line["detail"],
        "driver 550.54.15, CUDA 12.4: 1 GPU(s) (NVIDIA H100 80GB HBM3, 79.65 GiB each)"
    );

    // The driver lost the GPU sysfs still has on it.
    FakeDriver { cuda: 12040, gpus: vec![], ..Default::default() }.write(&config);
    let line = nvml_line(&library);
    assert_eq!(line["status"], "warn", "{line}");
    let detail = line["detail"].as_str().unwrap();
    assert!(detail.ends_with("0 GPU(s), but sysfs has 1 on the nvidia driver"), "{detail}");
    assert!(line["fix"].as_str().unwrap().contains("Xid"), "{line}");

    // No driver while a GPU is on it: no metrics, said so.
    FakeDriver { fail_init: true, ..Default::default() }.write(&config);
    let line = nvml_line(&library);
    assert_eq!(line["status"], "warn", "{line}");
    assert!(line["detail"].as_str().unwrap().contains("1 GPU(s) are on the nvidia driver"));
    let line = nvml_line("/nonexistent/libnvidia-ml.so.1");
    assert_eq!(line["status"], "warn", "{line}");

    // No GPU on the driver (none, or all on vfio-pci): nothing needs NVML.
    let empty = crate::support::sysfs::FakeSysfs::new();
    let env = [
        ("QUDATA_SYSFS_ROOT", empty.path().to_str().unwrap()),
        ("QUDATA_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1"),
    ];
    let report = json_report(&doctor(&["--json"], &env).0);
    let line = report.iter().find(|c| c["check"] == "nvml").unwrap();
    assert_eq!(line["status"], "ok", "{line}");
    assert!(line["detail"].as_str().unwrap().starts_with("not loaded"), "{line}");
}
