//! The container an instance becomes, as a pure function of the record (golden-tested).
//!
//! Everything is named from the instance id: the container is `qudata-<id>` and carries the
//! label [`LABEL_INSTANCE`]`=<id>`, which is what recovery trusts (never the name alone).

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};

use crate::instance::model::{Instance, marker};
use crate::instance::spec::Spec;

/// The label that marks a container as this agent's instance; its value is the instance id.
pub const LABEL_INSTANCE: &str = "ai.qudata.instance";
/// The label naming the agent that made the container: its data dir. One agent per data dir,
/// as QEMU's pidfiles live in one agent's run dir, so two agents sharing an engine (tests, a
/// misconfigured host) never take each other's containers for orphans.
pub const LABEL_OWNER: &str = "ai.qudata.owner";

/// Processes a container may have at once.
pub const PIDS_LIMIT: i64 = 4096;
/// Capabilities of Docker's default set that a renter's container does without: raw sockets
/// (spoofed packets), device nodes, file capabilities and changing the capability bounding
/// set. Kept: what sshd and package installs need (setuid/setgid, chroot, chown, audit
/// writes, binding port 22).
pub const CAP_DROP: &[&str] = &["NET_RAW", "MKNOD", "SETFCAP", "SETPCAP"];

/// The labels of instance `id` made by `owner`.
pub fn labels(id: &str, owner: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_INSTANCE.to_owned(), id.to_owned()),
        (LABEL_OWNER.to_owned(), owner.to_owned()),
    ])
}

/// Whether `labels` say the container is instance `id` of `owner`.
pub fn is_ours(labels: &HashMap<String, String>, id: &str, owner: &str) -> bool {
    labels.get(LABEL_INSTANCE).map(String::as_str) == Some(id)
        && labels.get(LABEL_OWNER).map(String::as_str) == Some(owner)
}

/// Whether a network carries this agent's owner label.
pub fn is_ours_network(labels: &HashMap<String, String>, owner: &str) -> bool {
    labels.get(LABEL_OWNER).map(String::as_str) == Some(owner)
}

/// The container's name: the same `qudata-<id>` marker QEMU's `-name` carries.
pub fn container_name(id: &str) -> String {
    marker(id)
}

/// The `docker create` body of `instance`. GPUs (all of them, through the NVIDIA runtime's
/// device request) only when the instance was given GPUs; ports on 127.0.0.1 only, where frpc
/// picks them up; the writable layer limited to `storage_gb` when `disk_quota` (the engine's
/// storage driver must support it: overlay2 on xfs with `pquota`, btrfs, zfs).
pub fn create_body(
    instance: &Instance,
    image: &str,
    owner: &str,
    disk_quota: bool,
    network: Option<&str>,
) -> ContainerCreateBody {
    let spec = &instance.spec;
    let gpus = !instance.gpus.is_empty();
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    // After the renter's values, so these win. Without GPUs, `void`: an image whose own
    // `ENV NVIDIA_VISIBLE_DEVICES=all` would otherwise get every GPU where nvidia is the
    // engine's default runtime.
    if gpus {
        env.push("NVIDIA_VISIBLE_DEVICES=all".into());
        env.push("NVIDIA_DRIVER_CAPABILITIES=compute,utility".into());
    } else {
        env.push("NVIDIA_VISIBLE_DEVICES=void".into());
    }
    let port_key = |guest: u16| format!("{guest}/tcp");
    let bindings: HashMap<String, Option<Vec<PortBinding>>> = instance
        .ports
        .iter()
        .map(|p| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(p.host_port.to_string()),
            };
            (port_key(p.guest_port), Some(vec![binding]))
        })
        .collect();
    let device_requests = gpus.then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            count: Some(-1),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let host_config = HostConfig {
        init: Some(true),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        nano_cpus: Some(i64::from(spec.cpus) * 1_000_000_000),
        memory: Some((spec.memory_mib * 1024 * 1024) as i64),
        port_bindings: Some(bindings),
        // The agent's network (`network.rs`); without one, the engine's default bridge.
        network_mode: network.map(str::to_owned),
        device_requests,
        storage_opt: disk_quota
            .then(|| HashMap::from([("size".to_owned(), format!("{}G", spec.storage_gb))])),
        // A fork bomb stays inside its container (QEMU and the agent must still start
        // processes).
        pids_limit: Some(PIDS_LIMIT),
        cap_drop: Some(CAP_DROP.iter().map(|c| (*c).to_owned()).collect()),
        security_opt: Some(vec!["no-new-privileges".into()]),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), "10m".to_owned()),
                ("max-file".to_owned(), "3".to_owned()),
            ])),
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(image.to_owned()),
        hostname: Some(instance.marker()),
        // The renter's command is a shell line by contract (as with `docker run IMAGE sh -c`);
        // it travels as one argv element, and its environment as data.
        cmd: spec.command.as_ref().map(|c| vec!["/bin/sh".into(), "-c".into(), c.clone()]),
        env: Some(env),
        exposed_ports: Some(instance.ports.iter().map(|p| port_key(p.guest_port)).collect()),
        labels: Some(labels(&instance.id, owner)),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Whether the engine's storage driver may limit a container's disk: btrfs and zfs can,
/// overlay2 only on xfs (mounted with `pquota`, which `docker info` does not show, so it is
/// tried); every other driver or backing file system cannot.
pub fn disk_quota_possible(info: &bollard::models::SystemInfo) -> bool {
    let backing = info.driver_status.iter().flatten().find_map(|pair| match pair.as_slice() {
        [key, value] if key == "Backing Filesystem" => Some(value.as_str()),
        _ => None,
    });
    match info.driver.as_deref() {
        Some("btrfs" | "zfs") => true,
        Some("overlay2") => backing.is_none_or(|fs| fs == "xfs"),
        _ => false,
    }
}

/// Whether the engine refused a create because its storage driver cannot limit a container's
/// disk (`--storage-opt is supported only for overlay over xfs with 'pquota' mount option`, and
/// the like from other drivers).
pub fn is_disk_quota_refusal(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("storage-opt") || message.contains("storage opt")
}

/// The renter may not set the NVIDIA runtime's variables: they would reach GPUs the instance
/// was not given (the runtime reads them even without a device request).
pub fn check_env(spec: &Spec) -> Result<(), String> {
    match spec.env.iter().find(|(k, _)| k.starts_with("NVIDIA_")) {
        Some((k, _)) => Err(format!(
            "{k}: NVIDIA_* variables are set by the agent from the GPUs the instance is given"
        )),
        None => Ok(()),
    }
}

/// A container gets every GPU of the host or none (the device request cannot name one GPU by
/// its PCI address), so a request for some of them is refused rather than given all.
pub fn check_gpus(gpus: &[String], host_gpus: &[String]) -> Result<(), String> {
    let all = gpus.len() == host_gpus.len() && host_gpus.iter().all(|g| gpus.contains(g));
    if gpus.is_empty() || all {
        return Ok(());
    }
    Err(format!(
        "a container can have all {} GPUs of this host or none, not {}; ask for gpus {} or 0",
        host_gpus.len(),
        gpus.len(),
        host_gpus.len()
    ))
}

/// The image of a spec, checked as a Docker reference (`[registry/]name[:tag][@digest]`).
pub fn image_of(spec: &Spec) -> Result<&str, String> {
    let Some(image) = spec.image.as_deref() else {
        return Err("is required: this host runs instances as Docker containers".into());
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
    let ok = image.len() <= 255
        && image.chars().all(allowed)
        && image.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !image.contains("//")
        && !image.ends_with([':', '/', '@']);
    if ok { Ok(image) } else { Err(format!("{image:?} is not a Docker image reference")) }
}

/// The reference to pull: the request's image, under the legacy `registry` field's host when
/// the image names none. An image naming another registry is refused: the login and password
/// go with the `registry` field, and the engine would send them wherever the image points.
pub fn pull_reference(spec: &Spec, allowed: &[String]) -> Result<String, String> {
    let image = image_of(spec)?;
    // Docker's rule: a first component with a dot or a port, or `localhost`, is a host.
    let host = image
        .split_once('/')
        .map(|(first, _)| first)
        .filter(|f| f.contains(['.', ':']) || *f == "localhost");
    if let Some(host) = host {
        check_registry_host(host, allowed)?;
    }
    let Some(registry) = spec.registry.registry.as_deref() else { return Ok(image.to_owned()) };
    match host {
        None => Ok(format!("{registry}/{image}")),
        Some(host) if host == registry => Ok(image.to_owned()),
        Some(host) => Err(format!(
            "{image:?} names the registry {host}, but registry is {registry}: the login would \
             go to the wrong registry"
        )),
    }
}

/// The registry of the legacy `registry` field: a host name with an optional port.
pub fn check_registry(spec: &Spec, allowed: &[String]) -> Result<(), String> {
    let Some(registry) = spec.registry.registry.as_deref() else { return Ok(()) };
    let host_char = |c: char| c.is_ascii_alphanumeric() || ".-:".contains(c);
    if registry.len() > 253 || !registry.chars().all(host_char) || registry.starts_with('-') {
        return Err(format!(
            "{registry:?} is not a registry host (like registry.example.com:5000)"
        ));
    }
    check_registry_host(registry, allowed)
}

/// The engine pulls from the host's network position: a registry on the host itself or on its
/// private networks (loopback, RFC 1918, CGNAT, link-local, unique-local) is refused, unless
/// the operator allowed that `host[:port]`.
pub fn check_registry_host(host_and_port: &str, allowed: &[String]) -> Result<(), String> {
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host_and_port)) {
        return Ok(());
    }
    let host = match host_and_port.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => host_and_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let lower = host.to_ascii_lowercase();
    let private = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            let [a, b, ..] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip.to_ipv4_mapped().is_some()
        }
        Err(_) => {
            lower == "localhost" || lower.ends_with(".localhost") || lower.ends_with(".local")
        }
    };
    if private {
        return Err(format!(
            "{host_and_port:?} is on the host or a private network; images come from public registries only"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
