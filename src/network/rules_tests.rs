use std::net::Ipv4Addr;
use std::path::Path;

use super::*;
use crate::network::subnet::{guest_mac, tap_name};

fn guest(last: u8) -> GuestNet {
    let subnet: Subnet = "10.213.0.0/24".parse().unwrap();
    let address = Ipv4Addr::new(10, 213, 0, last);
    GuestNet {
        address,
        mac: guest_mac(address),
        tap: tap_name("qudata0", &subnet, address).unwrap(),
    }
}

fn two_vms_and_containers() -> Vec<BridgeRules> {
    vec![
        BridgeRules {
            bridge: "qudata0".into(),
            subnet: "10.213.0.0/24".parse().unwrap(),
            host_services: true,
            guests: vec![guest(2), guest(3)],
            conntrack_limit: Some(4096),
            bandwidth_mbit: Some(200),
        },
        BridgeRules {
            bridge: "qudata0c".into(),
            subnet: "10.213.1.0/24".parse().unwrap(),
            host_services: false,
            guests: Vec::new(),
            conntrack_limit: None,
            bandwidth_mbit: None,
        },
    ]
}

/// Compares with `testdata/<name>`; `QUDATA_WRITE_GOLDEN=1` rewrites it.
fn golden(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/network/testdata").join(name);
    if std::env::var_os("QUDATA_WRITE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(text == want, "{name} differs from the golden file:\n{text}");
}

#[test]
fn ruleset_matches_the_golden_file() {
    let operator = ["203.0.113.0/24".to_owned(), "10.1.0.0/16".to_owned()];
    golden("ruleset.nft", &ruleset(&table_name("qudata0"), &two_vms_and_containers(), &operator));
}

#[test]
fn no_bridge_means_no_tables() {
    let script = ruleset("qudata_qudata0", &[], &[]);
    assert_eq!(script, removal("qudata_qudata0"));
    assert_eq!(
        script,
        "table inet qudata_qudata0\ndelete table inet qudata_qudata0\n\
         table bridge qudata_qudata0\ndelete table bridge qudata_qudata0\n"
    );
}

#[test]
fn every_blocked_range_is_a_network_address() {
    for range in BLOCKED {
        let (addr, len) = range.split_once('/').unwrap();
        let addr: Ipv4Addr = addr.parse().unwrap();
        let len: u32 = len.parse().unwrap();
        assert_eq!(u32::from(addr) & !(u32::MAX << (32 - len)), 0, "{range}");
    }
}

/// The kernel's own parser accepts the script (`nft --check` parses and validates it against
/// the kernel without committing).
#[test]
fn nft_accepts_the_ruleset() {
    // An operator's range inside a built-in one is merged, not a conflict.
    let operator = ["203.0.113.7/32".to_owned(), "10.1.0.0/16".to_owned()];
    let script = ruleset("qudata_check", &two_vms_and_containers(), &operator);
    let mut child = std::process::Command::new("nft")
        .args(["--check", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft (Debian package nftables) is installed by the test command");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{script}", String::from_utf8_lossy(&out.stderr));
}
