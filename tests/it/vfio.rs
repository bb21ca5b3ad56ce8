//! VFIO binding end to end against a fake sysfs tree driven by the simulated kernel
//! (tests/support/kernel.rs): bind, refusals that change nothing, rollback, release and
//! reconcile of what a crash left.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use qudata_agent::vfio::{PciAddress, Timeouts, Vfio, VfioError, record};

use crate::support::kernel::SimKernel;
use crate::support::sysfs::{CLASS_3D, CLASS_AUDIO, CLASS_BRIDGE, CLASS_ETHERNET, FakeSysfs};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn addrs(list: &[&str]) -> Vec<PciAddress> {
    list.iter().map(|s| addr(s)).collect()
}

/// An H100's BARs: 16 MiB 32-bit, 128 GiB and 32 MiB 64-bit.
const H100_BARS: &[(usize, u64, bool)] =
    &[(0, 16 * MIB, false), (1, 128 * GIB, true), (3, 32 * MIB, true)];

/// A data dir and a `/proc` for one test, and the `Vfio` over them.
struct Host {
    fake: FakeSysfs,
    dir: tempfile::TempDir,
    vfio: Vfio,
}

impl Host {
    /// The product's deadlines: the simulated kernel answers in milliseconds, but on a loaded
    /// machine its polling thread may lag by far more.
    fn new(fake: FakeSysfs) -> Host {
        Host::with_timeouts(fake, Timeouts::default())
    }

    /// Short deadlines, for the tests that wait one out on purpose.
    fn impatient(fake: FakeSysfs) -> Host {
        let short = Duration::from_secs(2);
        Host::with_timeouts(fake, Timeouts { write: short, settle: short })
    }

    fn with_timeouts(fake: FakeSysfs, timeouts: Timeouts) -> Host {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        let vfio = Vfio {
            sysfs: fake.root(),
            proc_root: dir.path().join("proc"),
            record_dir: dir.path().join("data/vfio"),
            quarantine: qudata_agent::vfio::Quarantine::new(&dir.path().join("data")),
            timeouts,
        };
        Host { fake, dir, vfio }
    }

    /// (device, driver, driver_override) of each device.
    fn state(&self, devices: &[&str]) -> Vec<(String, Option<String>, String)> {
        devices
            .iter()
            .map(|d| (d.to_string(), self.fake.driver_of(d), self.fake.override_of(d)))
            .collect()
    }

    fn records(&self) -> Vec<String> {
        record::load_all(&self.vfio.record_dir).unwrap().into_iter().map(|r| r.instance).collect()
    }

    fn proc(&self) -> &Path {
        &self.vfio.proc_root
    }
}

fn h100(fake: FakeSysfs, address: &str, group: u32) -> FakeSysfs {
    fake.device(address, 0x10de, 0x2330, CLASS_3D).driver("nvidia").group(group).bars(H100_BARS)
}

fn one_gpu_host() -> FakeSysfs {
    h100(FakeSysfs::new().driver_available("vfio-pci"), "0000:65:00.0", 12)
}

/// A consumer card: VGA + HDMI audio behind a bridge, all in group 40.
fn audio_gpu_host() -> FakeSysfs {
    FakeSysfs::new()
        .driver_available("vfio-pci")
        .device("0000:b2:00.0", 0x8086, 0x347a, CLASS_BRIDGE)
        .driver("pcieport")
        .group(40)
        .gpu("0000:b3:00.0", 0x2684)
        .driver("nvidia")
        .group(40)
        .bars(&[(0, 16 * MIB, false), (1, 32 * GIB, true), (3, 32 * MIB, true)])
        .function("0000:b3:00.1", CLASS_AUDIO)
        .driver("snd_hda_intel")
        .group(40)
        .bars(&[(0, 16 * 1024, false)])
}

const EIGHT: [&str; 8] = [
    "0000:18:00.0",
    "0000:2a:00.0",
    "0000:3a:00.0",
    "0000:5d:00.0",
    "0000:9a:00.0",
    "0000:ab:00.0",
    "0000:ba:00.0",
    "0000:db:00.0",
];

fn eight_gpu_host() -> FakeSysfs {
    let mut fake = FakeSysfs::new().driver_available("vfio-pci");
    for (i, a) in EIGHT.iter().enumerate() {
        fake = h100(fake, a, 100 + i as u32);
    }
    fake
}

#[test]
fn one_gpu_is_bound_with_a_private_record_and_released_back_to_nvidia() {
    let host = Host::new(one_gpu_host());
    let _kernel = SimKernel::start(&host.fake, &[]);
    let slots = host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].functions, addrs(&["0000:65:00.0"]));
    assert_eq!(slots[0].bar64_bytes, 128 * GIB + 32 * MIB);
    let gpu = "0000:65:00.0";
    assert_eq!(host.state(&[gpu]), [(gpu.into(), Some("vfio-pci".into()), "vfio-pci".into())]);

    let path = record::path(&host.vfio.record_dir, "i1");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let rec = record::load(&host.vfio.record_dir, "i1").unwrap().unwrap();
    assert_eq!(rec.devices[0].original_driver.as_deref(), Some("nvidia"));
    assert_eq!(rec.devices[0].original_override, None);

    let outcomes = host.vfio.release("i1").unwrap();
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert_eq!(host.state(&[gpu]), [(gpu.into(), Some("nvidia".into()), "(null)".into())]);
    assert!(!path.exists(), "the record is cleared once every device is back");
    assert!(host.vfio.release("i1").unwrap().is_empty(), "release is idempotent");
}

#[test]
fn a_gpu_with_an_audio_function_moves_whole_and_the_bridge_stays() {
    let host = Host::new(audio_gpu_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    let devices = ["0000:b2:00.0", "0000:b3:00.0", "0000:b3:00.1"];
    let before = host.state(&devices);
    let slots = host.vfio.bind("i1", &addrs(&["0000:b3:00.0"])).unwrap();
    assert_eq!(slots[0].functions, addrs(&["0000:b3:00.0", "0000:b3:00.1"]));
    assert_eq!(slots[0].bar64_bytes, 32 * GIB + 32 * MIB);
    let drivers: Vec<Option<String>> = devices.iter().map(|d| host.fake.driver_of(d)).collect();
    assert_eq!(
        drivers,
        [Some("pcieport".into()), Some("vfio-pci".into()), Some("vfio-pci".into())],
        "kernel log: {:?}",
        kernel.log()
    );
    host.vfio.release("i1").unwrap();
    assert_eq!(host.state(&devices), before);
}

#[test]
fn an_eight_gpu_host_serves_one_instance_or_several() {
    let host = Host::new(eight_gpu_host());
    let _kernel = SimKernel::start(&host.fake, &[]);
    let before = host.state(&EIGHT);
    let slots = host.vfio.bind("all", &addrs(&EIGHT)).unwrap();
    assert_eq!(slots.len(), 8);
    assert!(EIGHT.iter().all(|a| host.fake.driver_of(a).as_deref() == Some("vfio-pci")));
    host.vfio.release("all").unwrap();
    assert_eq!(host.state(&EIGHT), before);

    // Two instances with four GPUs each; neither can take the other's.
    host.vfio.bind("a", &addrs(&EIGHT[..4])).unwrap();
    host.vfio.bind("b", &addrs(&EIGHT[4..])).unwrap();
    let err = host.vfio.bind("c", &addrs(&EIGHT[3..5])).unwrap_err();
    assert!(matches!(&err, VfioError::InUse { instance, .. } if instance == "a"), "{err}");
    assert_eq!(host.records(), ["a", "b"], "a refusal writes no record");
    host.vfio.release("a").unwrap();
    assert!(EIGHT[..4].iter().all(|a| host.fake.driver_of(a).as_deref() == Some("nvidia")));
    assert!(EIGHT[4..].iter().all(|a| host.fake.driver_of(a).as_deref() == Some("vfio-pci")));
    host.vfio.release("b").unwrap();
    assert_eq!(host.state(&EIGHT), before);
}

/// Refusals: one sentence, and nothing on the host changed.
fn assert_refused_unchanged(host: &Host, gpu: &str, devices: &[&str], want: &str) {
    let kernel = SimKernel::start(&host.fake, &[]);
    let before = host.state(devices);
    let err = host.vfio.bind("i1", &addrs(&[gpu])).unwrap_err();
    let line = err.to_string();
    assert!(line.contains(want), "{line}");
    assert!(!line.contains('\n'), "{line}");
    assert_eq!(host.state(devices), before);
    assert!(host.records().is_empty());
    assert!(kernel.log().is_empty(), "no write reached the kernel: {:?}", kernel.log());
}

#[test]
fn a_group_shared_with_a_device_in_use_is_refused() {
    let fake = one_gpu_host()
        .device("0000:66:00.0", 0x8086, 0x1593, CLASS_ETHERNET)
        .driver("ice")
        .group(12);
    assert_refused_unchanged(
        &Host::new(fake),
        "0000:65:00.0",
        &["0000:65:00.0", "0000:66:00.0"],
        "0000:66:00.0 shares the IOMMU group of GPU 0000:65:00.0 and is used by the ice driver",
    );
    // An unbound peer in the group is no one's: it goes to vfio-pci with the GPU (the group
    // is only usable whole) and comes back unbound.
    let fake = one_gpu_host().device("0000:66:00.0", 0x8086, 0x1593, CLASS_ETHERNET).group(12);
    let host = Host::new(fake);
    let _kernel = SimKernel::start(&host.fake, &[]);
    let slots = host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    assert_eq!(slots[0].functions, addrs(&["0000:65:00.0"]), "only the slot goes to the guest");
    assert_eq!(host.fake.driver_of("0000:66:00.0").as_deref(), Some("vfio-pci"));
    host.vfio.release("i1").unwrap();
    assert_eq!(host.fake.driver_of("0000:66:00.0"), None);
    assert_eq!(host.fake.override_of("0000:66:00.0"), "(null)");
}

#[test]
fn nouveau_iommu_off_and_unknown_gpus_are_refused() {
    let nouveau = FakeSysfs::new()
        .driver_available("vfio-pci")
        .gpu("0000:01:00.0", 0x1eb8)
        .driver("nouveau")
        .group(1);
    assert_refused_unchanged(&Host::new(nouveau), "0000:01:00.0", &["0000:01:00.0"], "nouveau");
    let no_iommu =
        FakeSysfs::new().driver_available("vfio-pci").gpu("0000:01:00.0", 0x1eb8).driver("nvidia");
    assert_refused_unchanged(
        &Host::new(no_iommu),
        "0000:01:00.0",
        &["0000:01:00.0"],
        "the IOMMU is off",
    );
    assert_refused_unchanged(
        &Host::new(one_gpu_host()),
        "0000:99:00.0",
        &["0000:65:00.0"],
        "does not exist",
    );
    let no_vfio = h100(FakeSysfs::new(), "0000:65:00.0", 12);
    assert_refused_unchanged(
        &Host::new(no_vfio),
        "0000:65:00.0",
        &["0000:65:00.0"],
        "modprobe vfio-pci",
    );
}

#[test]
fn processes_holding_the_gpu_are_named_and_the_gpu_is_refused() {
    let host = Host::new(one_gpu_host());
    let proc = host.proc();
    let info = proc.join("driver/nvidia/gpus/0000:65:00.0");
    std::fs::create_dir_all(&info).unwrap();
    std::fs::write(info.join("information"), "Model: H100\nDevice Minor: 0\n").unwrap();
    for (pid, comm, node) in [(4242, "python3", "/dev/nvidia0"), (77, "bash", "/dev/nvidia1")] {
        let dir = proc.join(pid.to_string());
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        std::os::unix::fs::symlink(node, dir.join("fd/7")).unwrap();
    }
    assert_refused_unchanged(
        &host,
        "0000:65:00.0",
        &["0000:65:00.0"],
        "in use on the host by python3 (pid 4242, /dev/nvidia0); stop",
    );
}

#[test]
fn a_probe_that_never_binds_is_rolled_back_to_every_original_driver() {
    let host = Host::impatient(audio_gpu_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    kernel.refuse("0000:b3:00.1", "vfio-pci");
    let devices = ["0000:b3:00.0", "0000:b3:00.1"];
    let before = host.state(&devices);
    let err = host.vfio.bind("i1", &addrs(&["0000:b3:00.0"])).unwrap_err();
    assert!(
        matches!(&err, VfioError::Settle { address, want, .. } if address.as_str() == "0000:b3:00.1" && want == "vfio-pci"),
        "{err}"
    );
    assert_eq!(host.state(&devices), before, "kernel log: {:?}", kernel.log());
    assert!(host.records().is_empty());
    // The GPU did reach vfio-pci before the audio function failed: the rollback moved it back.
    let log = kernel.log();
    assert!(log.contains(&"bind 0000:b3:00.0 vfio-pci".to_owned()), "{log:?}");
    assert!(log.contains(&"bind 0000:b3:00.0 nvidia".to_owned()), "{log:?}");
}

#[test]
fn a_hung_write_times_out_and_is_rolled_back() {
    let host = Host::impatient(audio_gpu_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    kernel.hang("bus/pci/drivers/snd_hda_intel/unbind");
    let devices = ["0000:b3:00.0", "0000:b3:00.1"];
    let before = host.state(&devices);
    let err = host.vfio.bind("i1", &addrs(&["0000:b3:00.0"])).unwrap_err();
    assert!(matches!(err, VfioError::WriteTimeout { .. }), "{err}");
    assert_eq!(host.state(&devices), before, "kernel log: {:?}", kernel.log());
    assert!(host.records().is_empty());
}

#[test]
fn devices_the_host_keeps_on_vfio_pci_stay_there_on_release() {
    let fake = audio_gpu_host();
    let host = Host::new(fake);
    // The audio function's ids are on the kernel command line; the GPU is not.
    std::fs::write(host.proc().join("cmdline"), "ro intel_iommu=on vfio-pci.ids=10de:22bc\n")
        .unwrap();
    let _kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:b3:00.0"])).unwrap();
    host.vfio.release("i1").unwrap();
    assert_eq!(host.fake.driver_of("0000:b3:00.0").as_deref(), Some("nvidia"));
    assert_eq!(host.fake.driver_of("0000:b3:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(host.fake.override_of("0000:b3:00.1"), "(null)");
    assert!(host.records().is_empty());

    // A GPU that was on vfio-pci before stays there too.
    let host = Host::new(
        FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("vfio-pci").group(3).bars(H100_BARS),
    );
    let _kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    host.vfio.release("i1").unwrap();
    assert_eq!(host.fake.driver_of("0000:65:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(host.fake.override_of("0000:65:00.0"), "(null)");
}

#[test]
fn reconcile_undoes_a_bind_interrupted_between_two_writes_and_spares_live_instances() {
    let host = Host::new(eight_gpu_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    let before = host.state(&EIGHT);
    host.vfio.bind("alive", &addrs(&EIGHT[4..])).unwrap();
    // A crashed agent's half-done bind: the record, one GPU on vfio-pci, one unbound with
    // its override written, one with only the override written.
    let crashed = addrs(&EIGHT[..3]);
    let plan = host.vfio.plan(Some("crashed"), &crashed).unwrap();
    let rec = record::BindRecord {
        instance: "crashed".into(),
        devices: plan
            .devices
            .iter()
            .map(|d| record::BoundDevice {
                address: d.address.clone(),
                original_driver: d.driver.clone(),
                original_override: d.driver_override.clone(),
                keep_on_vfio: false,
            })
            .collect(),
    };
    record::save(&host.vfio.record_dir, &rec).unwrap();
    let sysfs = host.fake.path().join("bus/pci");
    for gpu in &EIGHT[..3] {
        std::fs::write(sysfs.join(format!("devices/{gpu}/driver_override")), "vfio-pci").unwrap();
    }
    std::fs::write(sysfs.join("drivers/nvidia/unbind"), EIGHT[0]).unwrap();
    kernel.wait_log(&format!("unbind {} nvidia", EIGHT[0]));
    std::fs::write(sysfs.join("drivers_probe"), EIGHT[0]).unwrap();
    kernel.wait_log(&format!("bind {} vfio-pci", EIGHT[0]));
    std::fs::write(sysfs.join("drivers/nvidia/unbind"), EIGHT[1]).unwrap();
    kernel.wait_log(&format!("unbind {} nvidia", EIGHT[1]));

    let outcomes = host.vfio.reconcile(&["alive".to_owned()]).unwrap();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| o.is_ok() && o.driver.as_deref() == Some("nvidia")),
        "{outcomes:?}"
    );
    assert_eq!(host.state(&EIGHT[..4]), before[..4]);
    assert!(EIGHT[4..].iter().all(|a| host.fake.driver_of(a).as_deref() == Some("vfio-pci")));
    assert_eq!(host.records(), ["alive"]);
    assert!(host.vfio.reconcile(&[]).unwrap().len() == 4);
    assert_eq!(host.state(&EIGHT), before);
    assert!(host.records().is_empty());
    let _ = host.dir.path();
}

#[test]
fn a_foreign_function_in_the_gpu_slot_is_never_taken_from_its_driver() {
    // An Intel NIC at function 1 of the GPU's slot, on e1000e: the whole slot would move.
    let fake = one_gpu_host()
        .device("0000:65:00.1", 0x8086, 0x10d3, CLASS_ETHERNET)
        .driver("e1000e")
        .group(12);
    assert_refused_unchanged(
        &Host::new(fake),
        "0000:65:00.0",
        &["0000:65:00.0", "0000:65:00.1"],
        "0000:65:00.1 sits in the slot of GPU 0000:65:00.0 but is not part of the GPU \
         (vendor 8086, class 020000 on the e1000e driver)",
    );
    // The GPU's own audio function on its host driver moves with it, as before.
    let host = Host::new(audio_gpu_host());
    let _kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:b3:00.0"])).unwrap();
    host.vfio.release("i1").unwrap();
}

/// One H100 whose functions offer FLR (and bus) resets.
fn resettable_host() -> FakeSysfs {
    h100(FakeSysfs::new().driver_available("vfio-pci"), "0000:65:00.0", 12).resettable("flr bus")
}

#[test]
fn a_release_resets_the_gpu_on_vfio_pci_before_it_goes_back() {
    let host = Host::new(resettable_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    let outcomes = host.vfio.release("i1").unwrap();
    assert!(outcomes.iter().all(|o| o.is_ok() && !o.quarantined), "{outcomes:?}");
    let log = kernel.log();
    let reset = log.iter().position(|l| l == "reset 0000:65:00.0 on vfio-pci");
    let unbind = log.iter().position(|l| l == "unbind 0000:65:00.0 vfio-pci");
    assert!(reset.is_some() && reset < unbind, "reset on vfio-pci, then unbind: {log:?}");
    assert_eq!(host.fake.driver_of("0000:65:00.0").as_deref(), Some("nvidia"));
    assert!(host.vfio.quarantine.load().unwrap().gpus.is_empty());
}

/// Asserts the GPU was quarantined by its release: kept on vfio-pci, no record left, refused
/// by the next bind with the reason, and returned by `release_quarantine`.
fn assert_quarantined_by_release(host: &Host, reason: &str) {
    let gpu = addr("0000:65:00.0");
    let outcomes = host.vfio.release("i1").unwrap();
    assert!(outcomes.iter().all(|o| o.is_ok() && o.quarantined), "{outcomes:?}");
    assert!(host.records().is_empty(), "the instance's record is gone");
    assert_eq!(host.fake.driver_of("0000:65:00.0").as_deref(), Some("vfio-pci"));
    let entry = host.vfio.quarantine.get(&gpu).unwrap().expect("quarantined");
    assert!(entry.reason.contains(reason), "{}", entry.reason);
    assert_eq!(entry.kept_on_vfio.len(), 1);
    // Persisted: another Vfio over the same data dir sees it.
    let again = qudata_agent::vfio::Quarantine::new(&host.dir.path().join("data"));
    assert!(again.get(&gpu).unwrap().is_some());
    let err = host.vfio.bind("i2", std::slice::from_ref(&gpu)).unwrap_err();
    assert!(matches!(err, VfioError::Quarantined { .. }), "{err}");
    let line = err.to_string();
    assert!(line.contains("is quarantined since") && line.contains(reason), "{line}");
    assert!(line.contains("qudata-agent gpu release-quarantine 0000:65:00.0"), "{line}");
}

#[test]
fn a_reset_that_fails_quarantines_the_gpu_on_vfio_pci_until_it_is_released() {
    let host = Host::new(resettable_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    kernel.fail_reset("0000:65:00.0");
    assert_quarantined_by_release(&host, "reset between tenants failed: writing \"1\" to");
    // A retry that fails again changes nothing.
    let cleared = qudata_agent::vfio::quarantine::Cleared { boot_id: "b".into(), log_micros: 1 };
    assert!(host.vfio.retry_quarantined(&cleared).unwrap().is_empty());
    assert_eq!(host.fake.driver_of("0000:65:00.0").as_deref(), Some("vfio-pci"));
    // The operator's release puts it back on nvidia and notes when.
    let gpu = addr("0000:65:00.0");
    let entry = host.vfio.release_quarantine(&gpu, cleared.clone()).unwrap().unwrap();
    assert!(entry.reason.contains("reset between tenants failed"));
    assert_eq!(host.fake.driver_of("0000:65:00.0").as_deref(), Some("nvidia"));
    let state = host.vfio.quarantine.load().unwrap();
    assert!(state.gpus.is_empty());
    assert_eq!(state.cleared.get(&gpu), Some(&cleared));
    host.vfio.bind("i2", &[gpu]).unwrap();
}

#[test]
fn a_reset_that_hangs_quarantines_the_gpu() {
    let host = Host::impatient(resettable_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    kernel.hang("bus/pci/devices/0000:65:00.0/reset");
    assert_quarantined_by_release(&host, "did not return within 2000 ms");
}

#[test]
fn a_gpu_that_does_not_answer_after_its_reset_is_quarantined_and_a_later_good_reset_frees_it() {
    let host = Host::new(resettable_host());
    let kernel = SimKernel::start(&host.fake, &[]);
    host.vfio.bind("i1", &addrs(&["0000:65:00.0"])).unwrap();
    host.fake.off_the_bus("0000:65:00.0");
    assert_quarantined_by_release(&host, "reads all ones in its config space");
    kernel.wait_log("reset 0000:65:00.0"); // the simulator sees writes a little later
    // The device answers again (a link retrained): the next retry resets and checks it, and
    // only then does it go back to its driver.
    std::fs::write(
        host.fake.real_dir("0000:65:00.0").join("config"),
        crate::support::sysfs::config_space(0x10de, 0x2330),
    )
    .unwrap();
    let cleared = qudata_agent::vfio::quarantine::Cleared { boot_id: "b".into(), log_micros: 1 };
    assert_eq!(host.vfio.retry_quarantined(&cleared).unwrap(), addrs(&["0000:65:00.0"]));
    assert_eq!(host.fake.driver_of("0000:65:00.0").as_deref(), Some("nvidia"));
    assert!(host.vfio.quarantine.load().unwrap().gpus.is_empty());
    let resets = kernel.log().iter().filter(|l| l.starts_with("reset 0000:65:00.0")).count();
    assert_eq!(resets, 2, "{:?}", kernel.log());
}

#[test]
fn a_card_without_a_reset_method_is_reset_through_a_bridge_that_serves_only_it() {
    // The consumer card: VGA + audio behind their own bridge, no FLR on either function.
    let host = Host::new(audio_gpu_host());
    let bridge = host.fake.real_dir("0000:b2:00.0");
    // Move the card's functions below the bridge, as the kernel's device tree has them.
    let root = host.fake.path().to_owned();
    for (f, driver) in [("0000:b3:00.0", "nvidia"), ("0000:b3:00.1", "snd_hda_intel")] {
        let below = bridge.join(f);
        std::fs::rename(host.fake.real_dir(f), &below).unwrap();
        // Every link to or from the moved directory, made absolute.
        let relink = |link: std::path::PathBuf, target: &Path| {
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink(target, &link).unwrap();
        };
        relink(root.join("bus/pci/devices").join(f), &below);
        relink(root.join("bus/pci/drivers").join(driver).join(f), &below);
        relink(root.join("kernel/iommu_groups/40/devices").join(f), &below);
        relink(below.join("driver"), &root.join("bus/pci/drivers").join(driver));
        relink(below.join("iommu_group"), &root.join("kernel/iommu_groups/40"));
    }
    std::fs::write(bridge.join("reset_subordinate"), "").unwrap();
    let native = [("0000:b3:00.0", "nvidia"), ("0000:b3:00.1", "snd_hda_intel")];
    let _kernel = SimKernel::start(&host.fake, &native);
    host.vfio.bind("i1", &addrs(&["0000:b3:00.0"])).unwrap();
    let outcomes = host.vfio.release("i1").unwrap();
    assert!(outcomes.iter().all(|o| o.is_ok() && !o.quarantined), "{outcomes:?}");
    assert_eq!(std::fs::read_to_string(bridge.join("reset_subordinate")).unwrap(), "1");
    let driver = host.vfio.sysfs.driver(&addr("0000:b3:00.0")).unwrap();
    assert_eq!(driver.as_deref(), Some("nvidia"));
}
