use std::fs;

use super::*;

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

const CPUINFO: &str = "processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n\
cpu MHz\t\t: 2400.000\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n\
cpu MHz\t\t: 3550.123\n";

fn roots(dir: &Path) -> Roots {
    Roots { proc: dir.join("proc"), sys: dir.join("sys"), etc: dir.join("etc") }
}

#[test]
fn reads_a_full_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "proc/cpuinfo", CPUINFO);
    write(d, "proc/meminfo", "MemTotal:       16777216 kB\nMemFree: 1 kB\n");
    write(d, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "3700000\n");
    write(d, "sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq", "3500000\n");
    write(d, "sys/class/net/eth0/speed", "10000\n");
    fs::create_dir_all(d.join("sys/class/net/eth0/device")).unwrap();
    write(d, "sys/class/net/eth1/speed", "-1\n");
    fs::create_dir_all(d.join("sys/class/net/eth1/device")).unwrap();
    // A virtual interface (no `device`) claiming a faster link is ignored.
    write(d, "sys/class/net/veth0/speed", "100000\n");
    write(d, "etc/machine-id", "0123abcd\n");

    let f = probe(&roots(d), d);
    assert_eq!(f.cpu_name, "AMD EPYC 9654 96-Core Processor");
    assert_eq!(f.cpu_cores, 2);
    assert_eq!(f.cpu_freq_ghz, 3.7);
    assert_eq!(f.ram_gib, 16.0);
    assert!(f.disk_gib > 0.0);
    assert_eq!(f.link_mbps, 10000.0);
    assert!(f.unknown.is_empty(), "{:?}", f.unknown);
    assert_eq!(fingerprint(&roots(d)), "0123abcd");
}

#[test]
fn frequency_falls_back_to_cpuinfo() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "proc/cpuinfo", CPUINFO);
    let f = probe(&roots(dir.path()), dir.path());
    assert_eq!(f.cpu_freq_ghz, 3.55);
}

#[test]
fn an_empty_host_lists_every_unknown_fact() {
    let dir = tempfile::tempdir().unwrap();
    let f = probe(&roots(dir.path()), &dir.path().join("missing"));
    assert_eq!(
        f.unknown,
        ["cpu_name", "cpu_cores", "cpu_freq", "ram", "disk", "ethernet_in/ethernet_out"]
    );
    assert_eq!((f.cpu_cores, f.ram_gib, f.link_mbps), (0, 0.0, 0.0));
    assert_eq!(fingerprint(&roots(dir.path())), "unknown");
}
