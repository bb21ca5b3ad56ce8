//! The create request: parsed from JSON by hand so that every bad field gets a sentence naming
//! it, and validated completely before anything starts (PROTOCOL.md §2 "Create request").

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::model::Proto;
use crate::config::is_dns_label;
use crate::secret::Secret;

/// A request that cannot be accepted; `field` names the JSON path of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), reason: reason.into() }
}

/// What the host can give, for defaults and limits.
#[derive(Clone, Debug)]
pub struct HostLimits {
    pub cpus: u32,
    pub memory_mib: u64,
    pub storage_gb: u64,
    pub default_cpus: u32,
    pub default_memory_mib: u64,
    pub default_storage_gb: u64,
}

/// One requested port. `remote_port` is `None` when the agent must pick it (legacy shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRequest {
    pub guest_port: u16,
    pub remote_port: Option<u16>,
    pub proto: Proto,
}

/// Registry credentials of the Docker backend (legacy fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    pub registry: Option<String>,
    pub login: Option<String>,
    /// Used once, for the pull; never persisted.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// A validated create request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub image: Option<String>,
    pub ports: Vec<PortRequest>,
    pub env: BTreeMap<String, String>,
    pub command: Option<String>,
    pub ssh_enabled: bool,
    pub cpus: u32,
    pub memory_mib: u64,
    pub storage_gb: u64,
    /// Requested GPU count; `None` = every free GPU.
    pub gpus: Option<u32>,
    pub tunnel_token: Option<String>,
    #[serde(default)]
    pub registry: Registry,
}

const MAX_PORTS: usize = 32;
const MAX_ENV: usize = 256;
const MAX_ENV_VALUE: usize = 32 * 1024;
const MAX_COMMAND: usize = 16 * 1024;
const MAX_IMAGE: usize = 512;

/// Parses and validates a create request body.
pub fn parse_create(body: &Value, host: &HostLimits) -> Result<Spec, SpecError> {
    let obj = body.as_object().ok_or_else(|| bad("body", "must be a JSON object"))?;
    let ssh_enabled = opt_bool(obj, "ssh_enabled")?.unwrap_or(false);
    let mut ports = parse_ports(obj.get("ports"))?;
    if ssh_enabled && !ports.iter().any(|p| p.guest_port == 22) {
        ports.push(PortRequest { guest_port: 22, remote_port: None, proto: Proto::Tcp });
    }
    if let Some(p) = ports.iter().find(|p| p.guest_port == 22 && p.proto != Proto::Tcp) {
        return Err(bad("ports", format!("guest port {} (SSH) must use proto tcp", p.guest_port)));
    }
    let image = opt_text(obj, "image", MAX_IMAGE)?;
    let image_tag = opt_text(obj, "image_tag", 128)?;
    let image = match (image, image_tag) {
        (Some(image), Some(tag)) if !image.contains(':') => Some(format!("{image}:{tag}")),
        (image, _) => image,
    };
    let command = opt_text(obj, "command", MAX_COMMAND)?;
    if let Some(c) = &command {
        if c.contains('\n') || c.contains('\r') {
            return Err(bad("command", "must be one line (no newline)"));
        }
        if c.trim().is_empty() {
            return Err(bad("command", "must not be blank"));
        }
    }
    let tunnel_token = opt_text(obj, "tunnel_token", 63)?;
    if let Some(t) = &tunnel_token
        && !is_dns_label(t)
    {
        return Err(bad("tunnel_token", "must be a DNS label (letters, digits, '-')"));
    }
    let cpus = match obj.get("cpus") {
        None | Some(Value::Null) => host.default_cpus,
        Some(v) => parse_count(v, "cpus")?,
    };
    if cpus == 0 || cpus > host.cpus {
        return Err(bad("cpus", format!("must be between 1 and {} (the host's CPUs)", host.cpus)));
    }
    let memory_mib = match obj.get("memory") {
        None | Some(Value::Null) => host.default_memory_mib,
        Some(v) => parse_memory(v)?,
    };
    if memory_mib < 128 || memory_mib > host.memory_mib {
        return Err(bad(
            "memory",
            format!("must be between 128M and {}M (what the host can give)", host.memory_mib),
        ));
    }
    let storage_gb = match obj.get("storage_gb") {
        None | Some(Value::Null) => host.default_storage_gb,
        Some(v) => u64::from(parse_count(v, "storage_gb")?),
    };
    if storage_gb == 0 || storage_gb > host.storage_gb {
        return Err(bad(
            "storage_gb",
            format!("must be between 1 and {} (free space on the host)", host.storage_gb),
        ));
    }
    let gpus = match obj.get("gpus") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_count(v, "gpus")?),
    };
    Ok(Spec {
        image,
        ports,
        env: parse_env(obj.get("env_variables"))?,
        command,
        ssh_enabled,
        cpus,
        memory_mib,
        storage_gb,
        gpus,
        tunnel_token,
        registry: Registry {
            registry: opt_text(obj, "registry", 256)?,
            login: opt_text(obj, "login", 256)?,
            password: opt_text(obj, "password", 1024)?.map(Secret::new),
        },
    })
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, SpecError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(key, "must be true or false")),
    }
}

/// A string field: printable, no NUL, bounded. Empty counts as absent.
fn opt_text(obj: &Map<String, Value>, key: &str, max: usize) -> Result<Option<String>, SpecError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            check_text(key, s, max)?;
            Ok(if s.is_empty() { None } else { Some(s.clone()) })
        }
        Some(_) => Err(bad(key, "must be a string")),
    }
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), SpecError> {
    if s.len() > max {
        return Err(bad(field, format!("is longer than {max} bytes")));
    }
    if s.contains('\0') {
        return Err(bad(field, "must not contain a NUL byte"));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t') {
        return Err(bad(field, "must not contain control characters"));
    }
    Ok(())
}

/// A positive count given as a number or a decimal string (`4` or `"4"`).
fn parse_count(v: &Value, field: &str) -> Result<u32, SpecError> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        _ => None,
    };
    let n = n.ok_or_else(|| bad(field, "must be a non-negative whole number"))?;
    u32::try_from(n).map_err(|_| bad(field, "is too large"))
}

/// Memory as `"32G"`, `"512M"`, `"1T"`, `"8GiB"`, or a number of GiB. Returns MiB.
fn parse_memory(v: &Value) -> Result<u64, SpecError> {
    let err = || bad("memory", "must be a size like \"8G\" or \"512M\", or a number of GiB");
    let (digits, unit) = match v {
        Value::Number(n) => (n.as_u64().ok_or_else(err)?.to_string(), "G".to_owned()),
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            (s[..split].to_owned(), s[split..].trim().to_ascii_uppercase())
        }
        _ => return Err(err()),
    };
    let amount: u64 = digits.parse().map_err(|_| err())?;
    let factor = match unit.as_str() {
        "M" | "MB" | "MI" | "MIB" => 1,
        "" | "G" | "GB" | "GI" | "GIB" => 1024,
        "T" | "TB" | "TI" | "TIB" => 1024 * 1024,
        _ => return Err(err()),
    };
    amount.checked_mul(factor).ok_or_else(|| bad("memory", "is too large"))
}

fn port_number(v: Option<&Value>, field: &str) -> Result<Option<u16>, SpecError> {
    let n = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        Some(_) => None,
    };
    match n {
        Some(p @ 1..=65535) => Ok(Some(p as u16)),
        Some(_) => Err(bad(field, "must be a port number between 1 and 65535")),
        None => Err(bad(field, "must be a port number")),
    }
}

fn parse_ports(v: Option<&Value>) -> Result<Vec<PortRequest>, SpecError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("ports", "must be an array")),
    };
    if items.len() > MAX_PORTS {
        return Err(bad("ports", format!("lists more than {MAX_PORTS} ports")));
    }
    let mut ports = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("ports[{i}]");
        let port = match item {
            // Legacy shape: "22" is tcp, every other port http; the agent picks remote ports.
            Value::String(_) | Value::Number(_) => {
                let guest = port_number(Some(item), &field)?.expect("present");
                let proto = if guest == 22 { Proto::Tcp } else { Proto::Http };
                PortRequest { guest_port: guest, remote_port: None, proto }
            }
            Value::Object(o) => parse_port_object(o, &field)?,
            _ => return Err(bad(field, "must be an object or a port number string")),
        };
        ports.push(port);
    }
    let mut guests = HashSet::new();
    let mut remotes = HashSet::new();
    for p in &ports {
        if !guests.insert(p.guest_port) {
            return Err(bad("ports", format!("guest port {} is listed twice", p.guest_port)));
        }
        if let Some(r) = p.remote_port
            && !remotes.insert(r)
        {
            return Err(bad("ports", format!("remote port {r} is listed twice")));
        }
    }
    Ok(ports)
}

fn parse_port_object(o: &Map<String, Value>, field: &str) -> Result<PortRequest, SpecError> {
    let guest = match (o.get("container_port"), o.get("guest_port")) {
        (Some(_), Some(_)) => {
            return Err(bad(field, "give container_port or guest_port, not both"));
        }
        (Some(v), None) => port_number(Some(v), &format!("{field}.container_port"))?,
        (None, v) => port_number(v, &format!("{field}.guest_port"))?,
    };
    let guest = guest.ok_or_else(|| bad(format!("{field}.container_port"), "is required"))?;
    let remote = port_number(o.get("remote_port"), &format!("{field}.remote_port"))?;
    let proto = match o.get("proto") {
        None | Some(Value::Null) if guest == 22 => Proto::Tcp,
        None | Some(Value::Null) => Proto::Http,
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "http" => Proto::Http,
            _ => return Err(bad(format!("{field}.proto"), "must be \"tcp\" or \"http\"")),
        },
        Some(_) => return Err(bad(format!("{field}.proto"), "must be \"tcp\" or \"http\"")),
    };
    Ok(PortRequest { guest_port: guest, remote_port: remote, proto })
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn parse_env(v: Option<&Value>) -> Result<BTreeMap<String, String>, SpecError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad("env_variables", "must be an object of strings")),
    };
    if obj.len() > MAX_ENV {
        return Err(bad("env_variables", format!("has more than {MAX_ENV} variables")));
    }
    let mut env = BTreeMap::new();
    for (name, value) in obj {
        if name.len() > 256 || !is_env_name(name) {
            return Err(bad(
                "env_variables",
                format!("{name:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(bad(format!("env_variables.{name}"), "must be a string")),
        };
        let field = format!("env_variables.{name}");
        check_text(&field, &value, MAX_ENV_VALUE)?;
        if value.contains('\n') {
            return Err(bad(field, "must be one line (no newline)"));
        }
        env.insert(name.clone(), value);
    }
    Ok(env)
}

/// Validates an `authorized_keys` line with the one key validator the guest code uses too.
pub fn parse_ssh_pubkey(line: &str) -> Result<String, SpecError> {
    crate::guest::keys::parse_public_key_line(line).map_err(|e| bad("ssh_pubkey", e.to_string()))
}

#[cfg(test)]
mod tests;
