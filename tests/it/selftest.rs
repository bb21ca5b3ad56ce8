//! `qudata-agent selftest`: the real binary against the fake `libnvidia-ml.so.1` and a fake
//! kernel log in `/dev/kmsg`'s format; the file it writes read back by the agent's own reader.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qudata_agent::gpu::selftest::{FILE_NAME, SelfTestInventory};
use serde_json::{Value, json};

use crate::support::nvml::{FakeDriver, FakeLink, fake_library, h100};

/// A data dir, a kernel log and a fake driver's config file.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new(driver: &FakeDriver, kmsg: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        driver.write(&dir.path().join("fake-nvml.conf"));
        std::fs::write(dir.path().join("kmsg"), kmsg).unwrap();
        Host { dir }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn inventory(&self) -> PathBuf {
        self.data().join(FILE_NAME)
    }

    /// `qudata-agent selftest <args>` with `library` as NVML.
    fn selftest(&self, library: &Path, args: &[&str]) -> Output {
        self.selftest_with(library, args, &[])
    }

    fn selftest_with(&self, library: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_qudata-agent"))
            .arg("selftest")
            .args(args)
            .env_clear()
            .env("QUDATA_DATA_DIR", self.data())
            .env("QUDATA_RUN_DIR", self.dir.path().join("run"))
            .env("QUDATA_KMSG_PATH", self.dir.path().join("kmsg"))
            .env("QUDATA_NVML_LIBRARY", library)
            .env("FAKE_NVML_CONFIG", self.dir.path().join("fake-nvml.conf"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run qudata-agent selftest")
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn both(out: &Output) -> String {
    format!("{}{}", stdout(out), String::from_utf8_lossy(&out.stderr))
}

/// Two H100s at 0000:65:00.0 and 0000:b3:00.0; the second on a narrower link, ECC off, no
/// power limit reported.
fn two_gpus(b3_remap_failure: bool) -> FakeDriver {
    let narrow = FakeLink {
        gen_current: Some(4),
        width_current: Some(8),
        ecc: Some(false),
        power_limit_mw: None,
        ..FakeLink::h100()
    };
    FakeDriver {
        cuda: 12040,
        gpus: vec![h100(0, 30, 0, None), h100(0, 30, 0, None)],
        health: vec![(0, 0x65, false, false, false), (1, 0xb3, false, false, b3_remap_failure)],
        links: vec![(0, FakeLink::h100()), (1, narrow)],
        ..Default::default()
    }
}

/// A `/dev/kmsg` record of an Xid.
fn xid(seq: u32, slot: &str, xid: u32) -> String {
    format!(
        "3,{seq},{},-;NVRM: Xid (PCI:{slot}): {xid}, pid=1234, name=python3, details\n",
        seq * 1000
    )
}

#[test]
fn healthy_gpus_are_written_with_their_facts() {
    // A program's fault (Xid 13) is listed, but does not fail the GPU.
    let host = Host::new(&two_gpus(false), &xid(1, "0000:b3:00", 13));
    let out = host.selftest(&fake_library(), &[]);
    assert!(out.status.success(), "{}", both(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "0000:65:00.0  NVIDIA H100 80GB HBM3  81559 MiB  PCIe gen5 x16 (max gen5 x16)  ECC on  700 W  ok",
            "0000:b3:00.0  NVIDIA H100 80GB HBM3  81559 MiB  PCIe gen4 x8 (max gen5 x16)  ECC off  power limit n/a  ok",
            &format!(
                "driver 550.54.15, CUDA 12.4: 2 GPU(s) written to {}",
                host.inventory().display()
            ),
        ],
        "{text}"
    );

    let mode = std::fs::metadata(host.inventory()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let inventory = SelfTestInventory::read(&host.inventory()).unwrap().expect("written");
    assert_eq!(inventory.version, 1);
    assert_eq!(
        (inventory.driver_version.as_deref(), inventory.cuda_version.as_str()),
        (Some("550.54.15"), "12.4")
    );
    let facts = inventory.facts(None);
    assert_eq!(
        (facts.name.as_str(), facts.count, facts.vram_gib, facts.max_cuda),
        ("NVIDIA H100 80GB HBM3", 2, 79.65, 12.4)
    );

    let file: Value = serde_json::from_slice(&std::fs::read(host.inventory()).unwrap()).unwrap();
    assert_eq!(
        file["gpus"][1],
        json!({
            "pci_address": "0000:b3:00.0", "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559,
            "pcie": {"gen_current": 4, "gen_max": 5, "width_current": 8, "width_max": 16},
            "ecc_enabled": false,
            "health": {
                "ok": true,
                "memory": {"retired_pages_pending": false, "row_remap_pending": false, "row_remap_failure": false},
                "xids": [{"xid": 13, "count": 1, "fatal": false}]
            }
        })
    );
    assert_eq!(file["gpus"][0]["power_limit_w"], 700.0);

    // --json prints what it writes.
    let out = host.selftest(&fake_library(), &["--json"]);
    assert!(out.status.success(), "{}", both(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: Value = serde_json::from_slice(&std::fs::read(host.inventory()).unwrap()).unwrap();
    assert_eq!(printed, written);
    assert_eq!(printed["gpus"].as_array().unwrap().len(), 2);

    // An unreadable kernel log is said; the GPUs are judged on NVML alone.
    std::fs::remove_file(host.dir.path().join("kmsg")).unwrap();
    let out = host.selftest(&fake_library(), &[]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(stdout(&out).contains("cannot read the kernel log"), "{}", both(&out));
    assert!(stdout(&out).contains(": Xids not checked\n"), "{}", both(&out));
    let file: Value = serde_json::from_slice(&std::fs::read(host.inventory()).unwrap()).unwrap();
    assert!(file["gpus"][0]["health"].get("xids").is_none(), "{file}");
}

/// `QUDATA_GPU_PCI_ADDRS`: only the offered GPUs are tested; one the driver does not own fails
/// the self-test; a typo stops it as it stops `run`.
#[test]
fn only_the_offered_gpus_are_tested() {
    use crate::support::sysfs::{CLASS_3D, FakeSysfs};
    let sysfs = ["0000:65:00.0", "0000:b3:00.0", "0000:ca:00.0"]
        .iter()
        .fold(FakeSysfs::new(), |f, a| f.device(a, 0x10de, 0x2330, CLASS_3D).driver("nvidia"));
    let host = Host::new(&two_gpus(true), "");
    let env = |list: &str| {
        [
            ("QUDATA_SYSFS_ROOT", sysfs.path().display().to_string()),
            ("QUDATA_GPU_PCI_ADDRS", list.to_owned()),
        ]
    };
    let out = host.selftest_with(&fake_library(), &[], &env("0000:65:00.0"));
    assert!(out.status.success(), "the unfit 0000:b3:00.0 is not offered: {}", both(&out));
    let inventory = SelfTestInventory::read(&host.inventory()).unwrap().unwrap();
    let listed: Vec<&str> = inventory.gpus.iter().map(|g| g.pci_address.as_str()).collect();
    assert_eq!(listed, ["0000:65:00.0"]);

    let out = host.selftest_with(&fake_library(), &[], &env("0000:65:00.0,0000:ca:00.0"));
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(stdout(&out).contains("0000:ca:00.0  not seen by the NVIDIA driver"), "{}", both(&out));

    let out = host.selftest_with(&fake_library(), &[], &env("0000:01:00.0"));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(both(&out).starts_with("qudata-agent: QUDATA_GPU_PCI_ADDRS"), "{}", both(&out));
}

#[test]
fn a_failed_remapping_or_a_fatal_xid_fails_the_gpu_and_the_file_says_so() {
    let log = [xid(1, "0000:65:00", 79), xid(2, "0000:65:00", 79), xid(3, "0000:65:00", 13)];
    let host = Host::new(&two_gpus(true), &log.concat());
    let out = host.selftest(&fake_library(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].ends_with(
            "  not ok: the kernel logged Xid 79 (GPU has fallen off the bus) 2 times since boot"
        ),
        "{text}"
    );
    assert!(
        lines[1].ends_with("  not ok: NVML reports a row remapping failed (uncorrectable memory)"),
        "{text}"
    );
    assert!(lines[2].contains("2 GPU(s) written to"), "{text}");

    let inventory = SelfTestInventory::read(&host.inventory()).unwrap().expect("still written");
    let verdicts: Vec<_> = inventory.gpus.iter().map(|g| g.health.clone().unwrap()).collect();
    assert!(!verdicts[0].ok && !verdicts[1].ok, "{verdicts:?}");
    assert_eq!(verdicts[1].memory.row_remap_failure, Some(true));
    let xids: Vec<(u32, u32, bool)> =
        verdicts[0].xids.as_ref().unwrap().iter().map(|x| (x.xid, x.count, x.fatal)).collect();
    assert_eq!(xids, [(79, 2, true), (13, 1, false)]);
    assert_eq!(verdicts[1].xids.as_deref(), Some(&[][..]), "none logged for the second GPU");
}

#[test]
fn without_a_driver_it_says_so_and_writes_an_empty_inventory() {
    let host = Host::new(&FakeDriver::default(), "");
    let out = host.selftest(Path::new("/nonexistent/libnvidia-ml.so.1"), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let text = both(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("no NVIDIA driver (cannot load NVML from /nonexistent/"), "{text}");
    assert!(text.contains(&format!("empty GPU inventory to {}", host.inventory().display())));
    let inventory = SelfTestInventory::read(&host.inventory()).unwrap().expect("written");
    assert!(inventory.gpus.is_empty());
    assert_eq!(inventory.facts(None).count, 0);

    // A driver whose init fails is no driver either; --json keeps stdout for the inventory.
    let failing = Host::new(&FakeDriver { fail_init: true, ..Default::default() }, "");
    let out = failing.selftest(&fake_library(), &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["gpus"], json!([]));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("no NVIDIA driver"), "{}", both(&out));
}

#[test]
fn help_lists_the_variables_it_reads() {
    let out = Command::new(env!("CARGO_BIN_EXE_qudata-agent"))
        .args(["selftest", "--help"])
        .env_clear()
        .output()
        .unwrap();
    let help = stdout(&out);
    for variable in [
        "QUDATA_DATA_DIR",
        "QUDATA_NVML_LIBRARY",
        "QUDATA_KMSG_PATH",
        "QUDATA_SYSFS_ROOT",
        "QUDATA_GPU_PCI_ADDRS",
    ] {
        assert!(help.contains(variable), "{variable} missing from:\n{help}");
    }
}
