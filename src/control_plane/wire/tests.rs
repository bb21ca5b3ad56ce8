use super::*;

#[test]
fn init_request_golden() {
    let mut req = InitRequest {
        agent_id: "6f1c2b1e-3f0a-4c55-9d2e-0b7c9a1e2f30".into(),
        agent_port: 23456,
        address: "203.0.113.7".into(),
        fingerprint: "0123abcd".into(),
        pid: 4242,
        version: "0.1.0".into(),
        test_mode: false,
        backend: None,
        gpus: None,
    };
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"agent_id":"6f1c2b1e-3f0a-4c55-9d2e-0b7c9a1e2f30","agent_port":23456,"address":"203.0.113.7","fingerprint":"0123abcd","pid":4242,"version":"0.1.0"}"#
    );
    req.test_mode = true;
    req.backend = Some("qemu");
    req.gpus = Some(2);
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"agent_id":"6f1c2b1e-3f0a-4c55-9d2e-0b7c9a1e2f30","agent_port":23456,"address":"203.0.113.7","fingerprint":"0123abcd","pid":4242,"version":"0.1.0","test_mode":true,"backend":"qemu","gpus":2}"#
    );
}

#[test]
fn init_response_reads_what_is_present_and_ignores_the_rest() {
    let full: InitResponse = serde_json::from_str(
        r#"{"secret_key":"sk-1","host_exists":true,"instance_running":false,"new_field":[1],
            "frp":{"server_addr":"frp.example","server_port":7000,"token":"t-1","subdomain":"h1","x":1}}"#,
    )
    .unwrap();
    assert_eq!(full.secret_key.unwrap().expose(), "sk-1");
    assert!(full.host_exists);
    assert_eq!(full.instance_running, Some(false));
    let frp = full.frp.unwrap();
    assert_eq!(frp.server_addr.as_deref(), Some("frp.example"));
    assert_eq!(frp.server_port, Some(7000));
    assert_eq!(frp.token.unwrap().expose(), "t-1");
    assert_eq!(frp.subdomain.as_deref(), Some("h1"));

    let old: InitResponse =
        serde_json::from_str(r#"{"secret_key":"","tunnel_token":"legacy-sub"}"#).unwrap();
    assert!(old.secret_key.unwrap().is_empty());
    assert!(!old.host_exists);
    assert!(old.frp.is_none());
    assert_eq!(old.tunnel_token.as_deref(), Some("legacy-sub"));
    assert!(old.instance_running.is_none());
}

#[test]
fn host_registration_golden_has_every_key() {
    let empty = HostRegistration::default();
    assert_eq!(
        serde_json::to_string(&empty).unwrap(),
        r#"{"gpu_name":"","gpu_amount":0,"vram":0.0,"max_cuda":0.0,"location":{"city":"","country":"","region":""},"configuration":{"ram":{"amount":0.0,"unit":"gb"},"disk":{"amount":0.0,"unit":"gb"},"cpu_name":"","cpu_cores":0,"cpu_freq":0.0,"memory_speed":0,"ethernet_in":0.0,"ethernet_out":0.0,"capacity":0.0,"max_cuda_version":0.0}}"#
    );
    let host = HostRegistration {
        gpu_name: gpu_name("NVIDIA H100 80GB HBM3"),
        gpu_amount: 8,
        vram: 80.0,
        max_cuda: 12.4,
        location: Location::default(),
        gpu_health: Vec::new(),
        configuration: Configuration {
            ram: Amount::gb(2015.5),
            disk: Amount::gb(7000.25),
            cpu_name: "AMD EPYC 9654 96-Core Processor".into(),
            cpu_cores: 192,
            cpu_freq: 3.7,
            memory_speed: 4800,
            ethernet_in: 25000.0,
            ethernet_out: 25000.0,
            capacity: 0.0,
            max_cuda_version: 12.4,
        },
    };
    assert_eq!(
        serde_json::to_string(&host).unwrap(),
        r#"{"gpu_name":"H10080GBHBM3","gpu_amount":8,"vram":80.0,"max_cuda":12.4,"location":{"city":"","country":"","region":""},"configuration":{"ram":{"amount":2015.5,"unit":"gb"},"disk":{"amount":7000.25,"unit":"gb"},"cpu_name":"AMD EPYC 9654 96-Core Processor","cpu_cores":192,"cpu_freq":3.7,"memory_speed":4800,"ethernet_in":25000.0,"ethernet_out":25000.0,"capacity":0.0,"max_cuda_version":12.4}}"#
    );
}

#[test]
fn gpu_name_drops_the_vendor_prefix_and_spaces() {
    let cases = [
        ("NVIDIA H100 80GB HBM3", "H10080GBHBM3"),
        ("NVIDIA GeForce RTX 4090", "GeForceRTX4090"),
        ("  NVIDIA A100-SXM4-40GB ", "A100-SXM4-40GB"),
        ("Tesla T4", "TeslaT4"),
        ("NVIDIAX", "NVIDIAX"),
        ("", ""),
    ];
    for (input, want) in cases {
        assert_eq!(gpu_name(input), want, "{input:?}");
    }
}

fn sample() -> Stats {
    Stats {
        gpu_util: 0.0,
        gpu_temp: 0,
        cpu_util: 12.5,
        ram_util: 40.25,
        mem_util: 0.0,
        inet_in: 1500,
        inet_out: 300,
        status: Status::Destroyed,
        gpus: Vec::new(),
        gpu_health: Vec::new(),
    }
}

#[test]
fn gpu_health_golden_in_stats_and_host_registration() {
    use crate::gpu::health::{GpuHealth, Health};
    let since = chrono::DateTime::parse_from_rfc3339("2026-12-06T12:00:00Z").unwrap().to_utc();
    let health = vec![
        GpuHealth {
            pci: "0000:65:00.0".into(),
            health: Health::Healthy,
            reason: None,
            since: None,
        },
        GpuHealth {
            pci: "0000:b3:00.0".into(),
            health: Health::Quarantined,
            reason: Some("the kernel logged Xid 79 (GPU has fallen off the bus)".into()),
            since: Some(since),
        },
        GpuHealth {
            pci: "0000:ca:00.0".into(),
            health: Health::Lost,
            reason: Some("gone".into()),
            since: None,
        },
    ];
    let want = r#""gpu_health":[{"pci":"0000:65:00.0","health":"healthy"},{"pci":"0000:b3:00.0","health":"quarantined","reason":"the kernel logged Xid 79 (GPU has fallen off the bus)","since":"2026-12-06T12:00:00Z"},{"pci":"0000:ca:00.0","health":"lost","reason":"gone"}]"#;
    let stats = Stats { gpu_health: health.clone(), ..sample() };
    let text = serde_json::to_string(&stats).unwrap();
    assert!(text.ends_with(&format!(r#""status":"destroyed",{want}}}"#)), "{text}");
    let host = HostRegistration { gpu_health: health, ..HostRegistration::default() };
    let text = serde_json::to_string(&host).unwrap();
    assert!(text.ends_with(&format!(r#""max_cuda_version":0.0}},{want}}}"#)), "{text}");
}

#[test]
fn stats_golden_flat_keys() {
    assert_eq!(
        serde_json::to_string(&sample()).unwrap(),
        r#"{"gpu_util":0.0,"gpu_temp":0,"cpu_util":12.5,"ram_util":40.25,"mem_util":0.0,"inet_in":1500,"inet_out":300,"status":"destroyed"}"#
    );
}

#[test]
fn stats_golden_with_gpus() {
    let mut s = sample();
    s.status = Status::Running;
    s.gpus = vec![GpuStats {
        index: 0,
        util: 97.0,
        temp: 71,
        mem_used_mib: 40000,
        mem_total_mib: 81559,
        power_w: 612.5,
    }];
    assert_eq!(
        serde_json::to_string(&s).unwrap(),
        r#"{"gpu_util":0.0,"gpu_temp":0,"cpu_util":12.5,"ram_util":40.25,"mem_util":0.0,"inet_in":1500,"inet_out":300,"status":"running","gpus":[{"index":0,"util":97.0,"temp":71,"mem_used_mib":40000,"mem_total_mib":81559,"power_w":612.5}]}"#
    );
}
