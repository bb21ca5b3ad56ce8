use serde_json::json;

use super::*;

fn host() -> HostLimits {
    HostLimits {
        cpus: 16,
        memory_mib: 64 * 1024,
        storage_gb: 500,
        default_cpus: 2,
        default_memory_mib: 2048,
        default_storage_gb: 10,
    }
}

fn field_of(body: Value) -> String {
    parse_create(&body, &host()).unwrap_err().field
}

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdj0ztsvqr9qxDpzEX9DHR4ZrCcGbiYfHqwMuX0MG0W";

#[test]
fn primary_shape_parses() {
    let spec = parse_create(
        &json!({
            "image": "pytorch/pytorch:2.1.0-cuda12.1-cudnn8-runtime",
            "ports": [{"container_port": 22, "remote_port": 10001, "proto": "tcp"},
                      {"container_port": 8888, "remote_port": 20000, "proto": "http"}],
            "env_variables": {"JUPYTER_TOKEN": "secret"},
            "command": "jupyter lab --ip=0.0.0.0 --allow-root",
            "ssh_enabled": true,
            "cpus": 8, "memory": "32G", "storage_gb": 100, "gpus": 1
        }),
        &host(),
    )
    .unwrap();
    assert_eq!(spec.cpus, 8);
    assert_eq!(spec.memory_mib, 32 * 1024);
    assert_eq!(spec.gpus, Some(1));
    assert_eq!(spec.ports.len(), 2);
    assert_eq!(
        spec.ports[1],
        PortRequest { guest_port: 8888, remote_port: Some(20000), proto: Proto::Http }
    );
    assert_eq!(spec.env["JUPYTER_TOKEN"], "secret");
}

#[test]
fn legacy_shape_parses() {
    let spec = parse_create(
        &json!({"ports": ["22", "8888"], "cpus": "4", "memory": "8G", "image": "ubuntu",
                "image_tag": "22.04", "tunnel_token": "abc-123", "password": "pw"}),
        &host(),
    )
    .unwrap();
    assert_eq!(spec.ports[0], PortRequest { guest_port: 22, remote_port: None, proto: Proto::Tcp });
    assert_eq!(spec.ports[1].proto, Proto::Http);
    assert_eq!(spec.cpus, 4);
    assert_eq!(spec.image.as_deref(), Some("ubuntu:22.04"));
    assert_eq!(spec.registry.password.as_ref().unwrap().expose(), "pw");
    let stored = serde_json::to_string(&spec).unwrap();
    assert!(!stored.contains("\"pw\""), "the registry password is never persisted");
}

#[test]
fn defaults_come_from_the_host_and_ssh_adds_port_22() {
    let spec = parse_create(&json!({"ssh_enabled": true}), &host()).unwrap();
    assert_eq!((spec.cpus, spec.memory_mib, spec.storage_gb), (2, 2048, 10));
    assert_eq!(spec.gpus, None);
    assert_eq!(spec.ports, [PortRequest { guest_port: 22, remote_port: None, proto: Proto::Tcp }]);
}

#[test]
fn each_bad_field_is_named() {
    let cases = [
        (json!([]), "body"),
        (json!({"ports": {}}), "ports"),
        (json!({"ports": [{"container_port": 0}]}), "ports[0].container_port"),
        (json!({"ports": [{"container_port": 70000}]}), "ports[0].container_port"),
        (json!({"ports": [{"container_port": -1}]}), "ports[0].container_port"),
        (json!({"ports": [{"container_port": 22.5}]}), "ports[0].container_port"),
        (json!({"ports": [{"container_port": 80, "proto": "udp"}]}), "ports[0].proto"),
        (json!({"ports": [{"remote_port": 80}]}), "ports[0].container_port"),
        (json!({"ports": [{"container_port": 80, "guest_port": 80}]}), "ports[0]"),
        (json!({"ports": [{"container_port": 80}, {"container_port": 80}]}), "ports"),
        (
            json!({"ports": [{"container_port": 80, "remote_port": 9},
                             {"container_port": 81, "remote_port": 9}]}),
            "ports",
        ),
        (json!({"ports": [{"container_port": 22, "proto": "http"}]}), "ports"),
        (json!({"ports": [true]}), "ports[0]"),
        (json!({"ports": ["0"]}), "ports[0]"),
        (json!({"env_variables": {"A=B": "x"}}), "env_variables"),
        (json!({"env_variables": {"1A": "x"}}), "env_variables"),
        (json!({"env_variables": {"": "x"}}), "env_variables"),
        (json!({"env_variables": {"A": {"x": 1}}}), "env_variables.A"),
        (json!({"env_variables": {"A": "a\u{0}b"}}), "env_variables.A"),
        (json!({"env_variables": {"A": "a\nb"}}), "env_variables.A"),
        (json!({"env_variables": ["A"]}), "env_variables"),
        (json!({"command": "a\u{0}b"}), "command"),
        (json!({"command": "a\nb"}), "command"),
        (json!({"command": 5}), "command"),
        (json!({"command": "  "}), "command"),
        (json!({"cpus": 0}), "cpus"),
        (json!({"cpus": 17}), "cpus"),
        (json!({"cpus": "four"}), "cpus"),
        (json!({"cpus": -2}), "cpus"),
        (json!({"memory": "lots"}), "memory"),
        (json!({"memory": "1P"}), "memory"),
        (json!({"memory": "65G"}), "memory"),
        (json!({"memory": "64M"}), "memory"),
        (json!({"storage_gb": 0}), "storage_gb"),
        (json!({"storage_gb": 501}), "storage_gb"),
        (json!({"gpus": "all"}), "gpus"),
        (json!({"ssh_enabled": "yes"}), "ssh_enabled"),
        (json!({"image": 7}), "image"),
        (json!({"image": "x".repeat(600)}), "image"),
        (json!({"tunnel_token": "has space"}), "tunnel_token"),
        (json!({"tunnel_token": "a.b"}), "tunnel_token"),
    ];
    for (body, field) in cases {
        assert_eq!(field_of(body.clone()), field, "{body}");
    }
}

#[test]
fn ssh_keys_are_checked_and_normalised() {
    assert_eq!(
        parse_ssh_pubkey(&format!("  {ED25519} me@laptop \n")).unwrap(),
        format!("{ED25519} me@laptop")
    );
    assert_eq!(parse_ssh_pubkey(ED25519).unwrap(), ED25519);
    for bad in [
        "",
        "ssh-ed25519",
        "ssh-ed25519 !!!notbase64",
        "ssh-dss AAAAB3NzaC1kc3M=",
        "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIGdj0ztsvqr9qxDpzEX9DHR4ZrCcGbiYfHqwMuX0MG0W",
        &format!("{ED25519}\nssh-ed25519 AAAA"),
        &format!("{ED25519} a\u{0}b"),
    ] {
        assert!(parse_ssh_pubkey(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn env_names() {
    assert!(is_env_name("_A1") && is_env_name("a"));
    assert!(!is_env_name("") && !is_env_name("9") && !is_env_name("A-B") && !is_env_name("Ä"));
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, hostile_text, json};

    const CREATE_KEYS: &[&str] = &[
        "image",
        "ports",
        "container_port",
        "guest_port",
        "remote_port",
        "proto",
        "env_variables",
        "command",
        "ssh_enabled",
        "cpus",
        "memory",
        "storage_gb",
        "gpus",
        "tunnel_token",
        "registry",
        "login",
        "password",
        "image_tag",
        "tcp",
        "http",
    ];

    /// A key line that is almost right: real key types and base64, with hostile parts.
    fn near_key_line() -> impl Strategy<Value = String> {
        let kind = prop_oneof![
            Just("ssh-ed25519"),
            Just("ssh-rsa"),
            Just("ecdsa-sha2-nistp256"),
            Just("sk-ssh-ed25519@openssh.com"),
            Just("command=\"rm -rf /\" ssh-ed25519"),
        ];
        let body = prop_oneof![
            Just("AAAAC3NzaC1lZDI1NTE5AAAAIGdj0ztsvqr9qxDpzEX9DHR4ZrCcGbiYfHqwMuX0MG0W".to_owned()),
            "[A-Za-z0-9+/=]{0,120}",
        ];
        (kind, body, hostile_text()).prop_map(|(k, b, c)| format!("{k} {b} {c}"))
    }

    /// Found by the fuzzer: a tab inside the comment (allowed, as OpenSSH allows it).
    #[test]
    fn a_tab_in_a_key_comment_is_kept() {
        let line = format!("{ED25519} a\t!");
        assert_eq!(parse_ssh_pubkey(&line).unwrap(), line);
    }

    proptest! {
        #![proptest_config(config())]

        /// Whatever the body, the parser answers; what it accepts is within the host.
        #[test]
        fn create_requests(body in json(CREATE_KEYS)) {
            let host = host();
            if let Ok(spec) = parse_create(&body, &host) {
                prop_assert!((1..=host.cpus).contains(&spec.cpus));
                prop_assert!(spec.memory_mib >= 1 && spec.memory_mib <= host.memory_mib);
                prop_assert!((1..=host.storage_gb).contains(&spec.storage_gb));
                prop_assert!(spec.ports.len() <= MAX_PORTS + 1);
                prop_assert!(spec.ports.iter().all(|p| p.guest_port >= 1));
                prop_assert!(spec.env.len() <= MAX_ENV);
                prop_assert!(spec.command.as_ref().is_none_or(|c| c.len() <= MAX_COMMAND));
            }
        }

        /// A key line is accepted as one line of printable text (a tab is OpenSSH's separator
        /// too), or refused.
        #[test]
        fn ssh_key_lines(line in prop_oneof![hostile_text(), near_key_line()]) {
            if let Ok(key) = parse_ssh_pubkey(&line) {
                prop_assert!(!key.chars().any(|c| c.is_control() && c != '\t'), "{key:?}");
                prop_assert!(!key.is_empty());
            }
        }
    }
}
