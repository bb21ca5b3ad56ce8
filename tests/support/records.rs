//! Instance records written the way the agent writes them (through its own store).

use std::path::Path;

use qudata_agent::instance::spec::{HostLimits, parse_create};
use qudata_agent::instance::store::Store;
use qudata_agent::instance::{BackendKind, Instance, Status};

/// A record of a small VM instance `id` in `status`.
pub fn store_record(data: &Path, id: &str, status: Status, ssh_enabled: bool) -> Instance {
    let limits = HostLimits {
        cpus: 2,
        memory_mib: 2048,
        storage_gb: 10,
        default_cpus: 1,
        default_memory_mib: 512,
        default_storage_gb: 2,
    };
    let body = serde_json::json!({ "ssh_enabled": ssh_enabled });
    let instance = Instance {
        id: id.into(),
        backend: BackendKind::Qemu,
        spec: parse_create(&body, &limits).unwrap(),
        status,
        error: (status == Status::Error).then(|| "the guest powered itself off".to_owned()),
        created_at: chrono::Utc::now(),
        ports: Vec::new(),
        gpus: Vec::new(),
        ssh_keys: Vec::new(),
        management_port: Some(super::agent::free_port()),
        network: None,
        deleting: false,
        vm_image: None,
        jupyter_token: None,
    };
    Store::open(data).unwrap().save(&instance).unwrap();
    instance
}
