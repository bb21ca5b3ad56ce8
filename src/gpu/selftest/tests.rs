use super::*;

/// The example of the module documentation, byte for byte.
const DOCUMENTED: &str = r#"{
  "version": 1,
  "tested_at": "2026-11-23T12:00:00Z",
  "driver_version": "550.54.15",
  "cuda_version": "12.4",
  "gpus": [
    {"pci_address": "0000:65:00.0", "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559}
  ]
}"#;

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn the_documented_example_reads_into_facts() {
    let (_dir, path) = write(DOCUMENTED);
    let inventory = SelfTestInventory::read(&path).unwrap().expect("present");
    assert_eq!(inventory.driver_version.as_deref(), Some("550.54.15"));
    let facts = inventory.facts(None);
    assert_eq!(
        facts,
        GpuFacts {
            name: "NVIDIA H100 80GB HBM3".into(),
            count: 1,
            vram_gib: 79.65,
            max_cuda: 12.4
        }
    );
    assert!(facts.unknown().is_empty());
}

#[test]
fn no_file_is_no_inventory() {
    let dir = tempfile::tempdir().unwrap();
    assert!(SelfTestInventory::read(&dir.path().join(FILE_NAME)).unwrap().is_none());
}

#[test]
fn selection_limits_the_count() {
    let two = DOCUMENTED.replace(
        "\n  ]",
        ",\n    {\"pci_address\": \"0000:B3:00.0\", \"name\": \"NVIDIA H100 80GB HBM3\", \"memory_total_mib\": 81559}\n  ]",
    );
    let (_dir, path) = write(&two);
    let inventory = SelfTestInventory::read(&path).unwrap().unwrap();
    assert_eq!(inventory.facts(None).count, 2);
    let only = ["0000:b3:00.0".to_owned()];
    assert_eq!(inventory.facts(Some(&only)).count, 1);
    let none = ["0000:01:00.0".to_owned()];
    let facts = inventory.facts(Some(&none));
    assert_eq!((facts.count, facts.name.as_str(), facts.vram_gib), (0, "", 0.0));
    assert_eq!(facts.max_cuda, 12.4, "the driver's CUDA version does not depend on the GPUs");
}

#[test]
fn another_version_is_named_as_such() {
    let (_dir, path) = write(&DOCUMENTED.replace("\"version\": 1", "\"version\": 2"));
    let err = SelfTestInventory::read(&path).unwrap_err();
    assert!(matches!(err, SelfTestError::Version { found: 2, .. }), "{err}");
    assert!(err.to_string().contains("update the agent"), "{err}");
}

#[test]
fn bad_files_say_which_field() {
    let cases = [
        (DOCUMENTED.replace("\"12.4\"", "\"twelve\""), "cuda_version"),
        (DOCUMENTED.replace("0000:65:00.0", "65:00.0"), "gpus[0].pci_address"),
        (DOCUMENTED.replace("\"NVIDIA H100 80GB HBM3\"", "\" \""), "gpus[0].name"),
        (DOCUMENTED.replace("81559", "0"), "gpus[0].memory_total_mib"),
    ];
    for (text, field) in cases {
        let (_dir, path) = write(&text);
        match SelfTestInventory::read(&path) {
            Err(SelfTestError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let (_dir, path) = write("{\"version\": 1, \"gpus\": ");
    assert!(matches!(SelfTestInventory::read(&path), Err(SelfTestError::Parse { .. })));
}

#[test]
fn fields_added_later_are_ignored() {
    let (_dir, path) =
        write(&DOCUMENTED.replace("\"version\": 1,", "\"version\": 1, \"ecc\": true,"));
    assert!(SelfTestInventory::read(&path).unwrap().is_some());
}

#[test]
fn an_empty_inventory_needs_no_cuda_version() {
    let (_dir, path) = write(r#"{"version": 1, "cuda_version": "", "gpus": []}"#);
    let inventory = SelfTestInventory::read(&path).unwrap().unwrap();
    assert_eq!(inventory.facts(None).count, 0);
    let (_dir, path) = write(&DOCUMENTED.replace("\"12.4\"", "\"\""));
    match SelfTestInventory::read(&path) {
        Err(SelfTestError::Invalid { field, .. }) => assert_eq!(field, "cuda_version"),
        other => panic!("GPUs without a CUDA version: {other:?}"),
    }
}

#[test]
fn the_self_tests_fields_round_trip_through_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, documented) = write(DOCUMENTED);
    let mut inventory = SelfTestInventory::read(&documented).unwrap().unwrap();
    let gpu = &mut inventory.gpus[0];
    gpu.pcie = PcieLink { gen_current: Some(4), gen_max: Some(5), ..Default::default() };
    gpu.ecc_enabled = Some(true);
    gpu.power_limit_w = Some(700.0);
    gpu.health = Some(Verdict {
        ok: false,
        reasons: vec!["the kernel logged Xid 79 (GPU has fallen off the bus) since boot".into()],
        memory: MemoryHealth { row_remap_failure: Some(false), ..Default::default() },
        xids: Some(vec![XidCount { xid: 79, count: 1, fatal: true }]),
    });
    let path = dir.path().join("written.json");
    inventory.write(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(SelfTestInventory::read(&path).unwrap().unwrap(), inventory);
    // What an old file lacks stays out of a file written from it.
    let old = SelfTestInventory::read(&documented).unwrap().unwrap();
    old.write(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for absent in ["pcie", "ecc_enabled", "power_limit_w", "health"] {
        assert!(!text.contains(absent), "{absent}: {text}");
    }
}
