use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::instance::model::{BackendKind, Proto, PublishedPort, Status};
use crate::instance::spec::{PortRequest, Registry};

fn instance(gpus: Vec<String>, command: Option<&str>) -> Instance {
    let spec = Spec {
        image: Some("registry.example.com:5000/team/app:1.2".into()),
        ports: vec![PortRequest { guest_port: 22, remote_port: Some(10001), proto: Proto::Tcp }],
        env: BTreeMap::from([("B".into(), "two words".into()), ("A".into(), "$(x)".into())]),
        command: command.map(str::to_owned),
        ssh_enabled: true,
        cpus: 2,
        memory_mib: 1536,
        storage_gb: 10,
        gpus: None,
        tunnel_token: None,
        registry: Registry::default(),
    };
    Instance {
        id: "4f1c".into(),
        backend: BackendKind::Docker,
        spec,
        status: Status::Pending,
        error: None,
        created_at: chrono::DateTime::UNIX_EPOCH,
        ports: vec![
            PublishedPort {
                guest_port: 22,
                host_port: 41022,
                remote_port: 10001,
                proto: Proto::Tcp,
            },
            PublishedPort {
                guest_port: 8888,
                host_port: 41888,
                remote_port: 20000,
                proto: Proto::Http,
            },
        ],
        gpus,
        ssh_keys: Vec::new(),
        management_port: None,
        network: None,
        deleting: false,
        vm_image: None,
        jupyter_token: None,
    }
}

#[test]
fn golden_without_gpus() {
    let body = create_body(
        &instance(Vec::new(), Some("jupyter lab --ip=0.0.0.0")),
        "app:1",
        "/var/lib/qudata",
        true,
        None,
    );
    let expected = json!({
        "Hostname": "qudata-4f1c",
        "Env": ["A=$(x)", "B=two words", "NVIDIA_VISIBLE_DEVICES=void"],
        "Cmd": ["/bin/sh", "-c", "jupyter lab --ip=0.0.0.0"],
        "Image": "app:1",
        "Labels": {"ai.qudata.instance": "4f1c", "ai.qudata.owner": "/var/lib/qudata"},
        "ExposedPorts": {"22/tcp": {}, "8888/tcp": {}},
        "HostConfig": {
            "Memory": 1536 * 1024 * 1024,
            "NanoCpus": 2_000_000_000i64,
            "Init": true,
            "PortBindings": {
                "22/tcp": [{"HostIp": "127.0.0.1", "HostPort": "41022"}],
                "8888/tcp": [{"HostIp": "127.0.0.1", "HostPort": "41888"}]
            },
            "RestartPolicy": {"Name": "unless-stopped"},
            "StorageOpt": {"size": "10G"},
            "PidsLimit": 4096,
            "CapDrop": ["NET_RAW", "MKNOD", "SETFCAP", "SETPCAP"],
            "SecurityOpt": ["no-new-privileges"],
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
        }
    });
    assert_eq!(serde_json::to_value(&body).unwrap(), expected);
}

#[test]
fn without_disk_quota_support_no_storage_option() {
    let body = create_body(&instance(Vec::new(), None), "app:1", "/d", false, None);
    let value = serde_json::to_value(&body).unwrap();
    assert_eq!(value["HostConfig"].get("StorageOpt"), None, "{value}");
    let overlay = "--storage-opt is supported only for overlay over xfs with 'pquota' mount option";
    assert!(is_disk_quota_refusal(overlay));
    assert!(is_disk_quota_refusal("Storage Option not supported"));
    assert!(!is_disk_quota_refusal("No such image: app:1"));
}

#[test]
fn golden_with_gpus_and_the_image_default_command() {
    let body =
        create_body(&instance(vec!["0000:65:00.0".into()], None), "app:1", "/d", false, None);
    let value = serde_json::to_value(&body).unwrap();
    assert_eq!(value.get("Cmd"), None, "no command: the image's own");
    assert_eq!(
        value["Env"],
        json!([
            "A=$(x)",
            "B=two words",
            "NVIDIA_VISIBLE_DEVICES=all",
            "NVIDIA_DRIVER_CAPABILITIES=compute,utility"
        ])
    );
    assert_eq!(
        value["HostConfig"]["DeviceRequests"],
        json!([{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}])
    );
}

#[test]
fn image_references_are_checked() {
    let mut spec = instance(Vec::new(), None).spec;
    assert_eq!(image_of(&spec), Ok("registry.example.com:5000/team/app:1.2"));
    for bad in ["-rm", "a b", "app:", "x//y", "$(id)", "app;rm"] {
        spec.image = Some(bad.into());
        assert!(image_of(&spec).is_err(), "{bad}");
    }
    spec.image = None;
    assert!(image_of(&spec).unwrap_err().starts_with("is required"));
    spec.registry.registry = Some("reg.example.com:5000".into());
    assert_eq!(check_registry(&spec, &[]), Ok(()));
    spec.registry.registry = Some("https://reg/x".into());
    assert!(check_registry(&spec, &[]).is_err());
}

#[test]
fn the_registry_field_decides_where_the_image_is_pulled_from() {
    let mut spec = instance(Vec::new(), None).spec;
    let pull = |spec: &Spec| pull_reference(spec, &[]);
    assert_eq!(pull(&spec), Ok("registry.example.com:5000/team/app:1.2".into()), "no field");
    spec.registry.registry = Some("registry.example.com:5000".into());
    assert_eq!(pull(&spec), Ok("registry.example.com:5000/team/app:1.2".into()), "same host");
    spec.image = Some("team/app:1.2".into());
    assert_eq!(pull(&spec), Ok("registry.example.com:5000/team/app:1.2".into()), "no host");
    spec.image = Some("ghcr.io/team/app:1.2".into());
    assert!(pull(&spec).unwrap_err().contains("wrong registry"), "another host");
}

#[test]
fn ours_needs_both_labels() {
    let mine = labels("4f1c", "/var/lib/qudata");
    assert!(is_ours(&mine, "4f1c", "/var/lib/qudata"));
    assert!(!is_ours(&mine, "4f1c", "/other/agent"));
    assert!(!is_ours(&mine, "other", "/var/lib/qudata"));
    assert!(!is_ours(&HashMap::new(), "4f1c", "/var/lib/qudata"));
}

#[test]
fn the_renter_cannot_set_the_nvidia_runtime_variables() {
    let mut spec = instance(vec![], None).spec;
    assert_eq!(check_env(&spec), Ok(()));
    spec.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into());
    let err = check_env(&spec).unwrap_err();
    assert!(err.starts_with("NVIDIA_VISIBLE_DEVICES: NVIDIA_* variables are set by the agent"));
}

#[test]
fn a_container_gets_every_gpu_of_the_host_or_none() {
    let host: Vec<String> = ["0000:17:00.0", "0000:65:00.0"].map(String::from).to_vec();
    assert_eq!(check_gpus(&[], &host), Ok(()));
    let reversed: Vec<String> = host.iter().rev().cloned().collect();
    assert_eq!(check_gpus(&reversed, &host), Ok(()));
    assert_eq!(
        check_gpus(&host[..1], &host),
        Err("a container can have all 2 GPUs of this host or none, not 1; ask for gpus 2 or 0"
            .into())
    );
}

#[test]
fn registries_on_the_host_or_private_networks_are_refused() {
    for private in [
        "localhost:5000",
        "127.0.0.1:5000",
        "10.1.2.3",
        "172.16.0.1:443",
        "192.168.1.10:5000",
        "100.64.0.1",
        "169.254.169.254",
        "[::1]:5000",
        "[fd00::1]:5000",
        "[fe80::1]",
        "registry.local",
        "0.0.0.0",
    ] {
        let err = check_registry_host(private, &[]).unwrap_err();
        assert!(err.contains("private network"), "{private}: {err}");
    }
    for public in
        ["registry-1.docker.io", "ghcr.io", "nvcr.io:443", "8.8.8.8:5000", "[2001:db8::1]"]
    {
        assert_eq!(check_registry_host(public, &[]), Ok(()), "{public}");
    }
    // The operator may allow a mirror on the LAN, by its exact host and port.
    let mirror = ["10.0.0.5:5000".to_owned()];
    assert_eq!(check_registry_host("10.0.0.5:5000", &mirror), Ok(()));
    assert!(check_registry_host("10.0.0.5:5001", &mirror).is_err());
    // The host named inside the image counts as much as the `registry` field.
    let mut spec = instance(vec![], None).spec;
    spec.image = Some("10.0.0.5:5000/team/model:1".into());
    assert!(pull_reference(&spec, &[]).unwrap_err().contains("private network"));
    spec.image = Some("localhost/x".into());
    assert!(pull_reference(&spec, &[]).is_err());
    spec.image = Some("pytorch/pytorch:2.1.0".into());
    assert_eq!(pull_reference(&spec, &[]).unwrap(), "pytorch/pytorch:2.1.0");
}

#[test]
fn only_btrfs_zfs_or_overlay2_on_xfs_may_limit_a_containers_disk() {
    let info = |driver: &str, backing: Option<&str>| bollard::models::SystemInfo {
        driver: Some(driver.into()),
        driver_status: backing.map(|fs| vec![vec!["Backing Filesystem".into(), fs.into()]]),
        ..Default::default()
    };
    assert!(disk_quota_possible(&info("overlay2", Some("xfs"))));
    assert!(!disk_quota_possible(&info("overlay2", Some("extfs"))));
    assert!(disk_quota_possible(&info("btrfs", None)));
    assert!(disk_quota_possible(&info("zfs", None)));
    assert!(!disk_quota_possible(&info("vfs", None)));
}

#[test]
fn a_container_is_confined_whatever_its_image_says() {
    let body = create_body(
        &instance(vec![], None),
        "busybox:latest",
        "/var/lib/qudata",
        false,
        Some("qudata-qudata0c"),
    );
    let env = body.env.unwrap();
    assert_eq!(env.last().map(String::as_str), Some("NVIDIA_VISIBLE_DEVICES=void"));
    let host = body.host_config.unwrap();
    assert_eq!(host.pids_limit, Some(PIDS_LIMIT));
    assert_eq!(host.cap_drop.unwrap(), ["NET_RAW", "MKNOD", "SETFCAP", "SETPCAP"]);
    assert_eq!(host.security_opt.unwrap(), ["no-new-privileges"]);
    let logs = host.log_config.unwrap();
    assert_eq!(logs.typ.as_deref(), Some("json-file"));
    assert_eq!(logs.config.unwrap()["max-size"], "10m");
    assert_eq!(host.network_mode.as_deref(), Some("qudata-qudata0c"), "the agent's network");
}
