//! Every setting of the agent, in one table.
//!
//! Each setting is an environment variable with a default and a parser. The table is the single
//! source for validation, for `--help` (which lists the variables a command reads) and for the
//! README. A bad value stops the agent with one line naming the variable, what is wrong with the
//! value and what is accepted.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// Which commands read a setting (for `--help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Read by `run` only.
    Run,
    /// Read by `run`, `recover`, `doctor`, `gpu` and `selftest`.
    Host,
}

/// One row of the settings table.
pub struct Setting {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub accepted: &'static str,
    pub help: &'static str,
    pub scope: Scope,
    /// Never echo the value back (in errors, help or logs).
    pub secret: bool,
}

const fn row(
    name: &'static str,
    default: Option<&'static str>,
    accepted: &'static str,
    help: &'static str,
    scope: Scope,
) -> Setting {
    Setting { name, default, accepted, help, scope, secret: false }
}

/// The table. Keep it sorted by name.
pub const SETTINGS: &[Setting] = &[
    row(
        "QUDATA_AGENT_PORT",
        None,
        "a port number 1024-65535",
        "local port of the agent API (default: chosen once and persisted)",
        Scope::Run,
    ),
    Setting {
        secret: true,
        ..row(
            "QUDATA_API_KEY",
            None,
            "a key starting with `ak-`",
            "API key issued by Qudata (required unless --local)",
            Scope::Run,
        )
    },
    row(
        "QUDATA_BACKEND",
        Some("auto"),
        "auto, qemu or docker",
        "how instances are built",
        Scope::Host,
    ),
    row(
        "QUDATA_BASE_IMAGE",
        None,
        "a path to a qcow2 file",
        "base VM image (default: <data dir>/images/base.qcow2)",
        Scope::Host,
    ),
    row(
        "QUDATA_CONTAINER_SUBNET",
        Some("10.213.1.0/24"),
        "a private IPv4 network /16-/29, e.g. 10.213.1.0/24",
        "addresses of containers on the agent's Docker network (bridge `<QUDATA_VM_BRIDGE>c`)",
        Scope::Host,
    ),
    row(
        "QUDATA_DATA_DIR",
        Some("/var/lib/qudata"),
        "an absolute path",
        "persistent state: identity, instance records, disks",
        Scope::Host,
    ),
    row(
        "QUDATA_DEBUG",
        Some("false"),
        "true or false (1/0, yes/no)",
        "verbose logging",
        Scope::Host,
    ),
    row(
        "QUDATA_DOCKER_HOST",
        Some("unix:///var/run/docker.sock"),
        "unix:///<absolute path> (or an absolute socket path)",
        "Docker engine socket of the docker backend",
        Scope::Host,
    ),
    row(
        "QUDATA_DOCKER_PRIVATE_REGISTRIES",
        None,
        "comma-separated host[:port] list",
        "registries on the host or a private network that containers may pull from (a LAN mirror); others there are refused",
        Scope::Host,
    ),
    row(
        "QUDATA_DOCKER_PULL",
        Some("always"),
        "always or missing",
        "when containers' images are pulled: always (every create; the engine's copy of a public image only when the registry is unreachable or rate-limits) or missing (the engine's copy when it has one: air-gapped hosts); an image with a login is pulled every time",
        Scope::Host,
    ),
    row(
        "QUDATA_DOCKER_UNLIMITED_DISK",
        Some("false"),
        "true or false (1/0, yes/no)",
        "run containers without a disk limit when the engine cannot enforce storage_gb (else such creates are refused)",
        Scope::Host,
    ),
    row(
        "QUDATA_FRPC_BINARY",
        Some("frpc"),
        "a program name or path",
        "frp client binary",
        Scope::Host,
    ),
    row(
        "QUDATA_FRPC_CONFIG",
        Some("/etc/qudata/frpc.toml"),
        "an absolute path",
        "frpc main config (0600); per-instance includes go in frpc.d/ beside it",
        Scope::Host,
    ),
    row(
        "QUDATA_FRP_PORT",
        None,
        "a port number 1-65535",
        "FRP server port (wins over /init)",
        Scope::Host,
    ),
    row(
        "QUDATA_FRP_SERVER",
        None,
        "a host name or IP address",
        "FRP server address (wins over /init)",
        Scope::Host,
    ),
    row(
        "QUDATA_FRP_SUBDOMAIN",
        None,
        "a DNS label",
        "FRP subdomain of this host (wins over /init)",
        Scope::Host,
    ),
    Setting {
        secret: true,
        ..row(
            "QUDATA_FRP_TOKEN",
            None,
            "a non-empty token",
            "FRP server token (wins over /init)",
            Scope::Host,
        )
    },
    row(
        "QUDATA_GPU_PCI_ADDRS",
        None,
        "comma-separated PCI addresses like 0000:65:00.0",
        "GPUs offered to renters (default: every NVIDIA GPU found)",
        Scope::Host,
    ),
    row(
        "QUDATA_HOST_PORTS",
        Some("20000-22999"),
        "a range like 20000-22999 within 1024-65535, at least 16 ports",
        "ports on 127.0.0.1 the agent forwards to instances (what frpc connects to; local mode \
         shows them); keep them out of the kernel's ephemeral range (`doctor` checks)",
        Scope::Host,
    ),
    row(
        "QUDATA_HOST_RESERVED_CPUS",
        None,
        "a CPU list such as 0,64 or 0-1,32-33, or `none`",
        "CPUs kept for the host: no vCPU of a VM with GPUs runs there, and its QEMU's main loop \
         and I/O thread run only there (default: the first core of each NUMA node)",
        Scope::Host,
    ),
    row(
        "QUDATA_INSTANCE_CPUS",
        None,
        "a number of vCPUs 1-1024",
        "vCPUs of an instance whose request names none (default: every host CPU; 1 in local \
         mode); never more than the host has",
        Scope::Run,
    ),
    row(
        "QUDATA_INSTANCE_MEMORY",
        None,
        "a size like 8G or 512M",
        "memory of an instance whose request names none (default: the host's memory less its \
         reserve; 1G in local mode); never more than the host can give",
        Scope::Run,
    ),
    row(
        "QUDATA_KMSG_PATH",
        Some("/dev/kmsg"),
        "an absolute path",
        "the kernel log the agent watches for GPU errors (Xid, vfio-pci); tests point it elsewhere",
        Scope::Host,
    ),
    row(
        "QUDATA_NVML_LIBRARY",
        Some("libnvidia-ml.so.1"),
        "a library file name (found by the dynamic loader) or an absolute path",
        "NVIDIA management library for GPU facts and metrics (absent: no driver, reported cleanly)",
        Scope::Host,
    ),
    row(
        "QUDATA_OVMF_CODE",
        None,
        "a path to an OVMF code image",
        "UEFI firmware code (default: detected under /usr/share/OVMF)",
        Scope::Host,
    ),
    row(
        "QUDATA_OVMF_VARS",
        None,
        "a path to an OVMF variables template",
        "UEFI variables template copied per VM (default: the one matching the code image)",
        Scope::Host,
    ),
    row(
        "QUDATA_PUBLIC_ADDRESS",
        None,
        "an IPv4 or IPv6 address",
        "public address reported to /init (default: detected)",
        Scope::Run,
    ),
    row(
        "QUDATA_QEMU_ACCEL",
        Some("auto"),
        "auto, kvm or tcg",
        "VM accelerator (auto: KVM when a probe guest runs under it, else TCG)",
        Scope::Host,
    ),
    row(
        "QUDATA_QEMU_BINARY",
        Some("qemu-system-x86_64"),
        "a program name or path",
        "QEMU system emulator",
        Scope::Host,
    ),
    row(
        "QUDATA_QEMU_USER",
        Some("qudata-qemu"),
        "a system user name",
        "the unprivileged user QEMU runs as (made if missing)",
        Scope::Host,
    ),
    row(
        "QUDATA_RUN_DIR",
        Some("/run/qudata"),
        "an absolute path",
        "sockets, pidfiles and locks (cleared at boot)",
        Scope::Host,
    ),
    row(
        "QUDATA_SERVICE_URL",
        Some("https://internal.qudata.ai/v0"),
        "an http:// or https:// URL",
        "Qudata control plane base URL",
        Scope::Run,
    ),
    row(
        "QUDATA_STATS_INTERVAL_MS",
        Some("500"),
        "milliseconds, 100-60000",
        "telemetry period",
        Scope::Run,
    ),
    row(
        "QUDATA_SYSFS_ROOT",
        Some("/sys"),
        "an absolute path",
        "where sysfs is mounted (GPU discovery and VFIO binding; tests point it elsewhere)",
        Scope::Host,
    ),
    row(
        "QUDATA_VM_BANDWIDTH_MBIT",
        None,
        "Mbit/s 1-100000",
        "limit of each instance's traffic, each way (default: none)",
        Scope::Run,
    ),
    row(
        "QUDATA_VM_BLOCKED",
        None,
        "IPv4 ranges a.b.c.d/len, comma-separated",
        "more destinations guests never reach, besides loopback, private, CGNAT, link-local, \
         multicast and reserved ranges (default: none)",
        Scope::Host,
    ),
    row(
        "QUDATA_VM_BOOT_TIMEOUT",
        None,
        "seconds 10-3600",
        "how long a VM may take from power-on to answering SSH (default: 180 under KVM, 420 \
         under TCG); a boot that fails sooner says so at once",
        Scope::Run,
    ),
    row(
        "QUDATA_VM_BRIDGE",
        Some("qudata0"),
        "1-9 lower-case letters and digits, a letter first",
        "the VMs' bridge; taps are `<bridge>-<n>`, the nftables tables `qudata_<bridge>`",
        Scope::Host,
    ),
    row(
        "QUDATA_VM_CONNTRACK_LIMIT",
        None,
        "connections 16-10000000",
        "connections one instance may have open through the host at once (default: none)",
        Scope::Run,
    ),
    row(
        "QUDATA_VM_DNS",
        None,
        "IPv4 addresses, comma-separated",
        "DNS servers the guests' resolver (on the bridge) asks (default: the host's, from \
         /etc/resolv.conf)",
        Scope::Run,
    ),
    row(
        "QUDATA_VM_SUBNET",
        Some("10.213.0.0/24"),
        "a private IPv4 network /16-/29, e.g. 10.213.0.0/24",
        "addresses of VMs on the bridge; the host is the first address",
        Scope::Host,
    ),
];

/// A setting whose value cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{variable}={shown}: {problem}; accepted: {accepted}")]
pub struct ConfigError {
    pub variable: &'static str,
    /// The offending value, or `<redacted>` for secrets.
    pub shown: String,
    pub problem: String,
    pub accepted: &'static str,
}

/// Which backend builds instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Qemu,
    Docker,
}

/// Which accelerator VMs run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when a probe guest really runs under it, else TCG.
    Auto,
    /// KVM, or a clear error when the probe fails.
    Kvm,
    /// TCG (software emulation), never KVM.
    Tcg,
}

/// FRP settings taken from the environment; each one wins over what `/init` sends.
#[derive(Clone, Debug, Default)]
pub struct FrpOverrides {
    pub server: Option<String>,
    pub port: Option<u16>,
    pub token: Option<Secret>,
    pub subdomain: Option<String>,
}

/// The validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub api_key: Option<Secret>,
    pub agent_port: Option<u16>,
    pub backend: BackendChoice,
    pub base_image: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub debug: bool,
    /// The Docker engine's socket (from `QUDATA_DOCKER_HOST`, `unix://` stripped).
    pub docker_host: PathBuf,
    /// The operator accepts containers whose `storage_gb` the engine cannot enforce.
    pub docker_unlimited_disk: bool,
    /// Registries on private addresses containers may pull from.
    pub docker_private_registries: Vec<String>,
    /// When a container's image is pulled.
    pub docker_pull: crate::backend::docker::pull::PullPolicy,
    pub frpc_binary: PathBuf,
    pub frpc_config: PathBuf,
    pub frp: FrpOverrides,
    pub gpu_pci_addrs: Option<Vec<String>>,
    /// Ports on 127.0.0.1 forwarded to instances.
    pub host_ports: std::ops::RangeInclusive<u16>,
    /// CPUs kept for the host; `None`: the first core of each NUMA node.
    pub host_reserved_cpus: Option<Vec<u32>>,
    /// vCPUs and memory (MiB) of an instance whose request names none; `None`: the host's
    /// default (see `agent::limits`).
    pub instance_cpus: Option<u32>,
    pub instance_memory_mib: Option<u64>,
    /// The kernel log (records as `/dev/kmsg` gives them) watched for GPU errors.
    pub kmsg_path: PathBuf,
    pub nvml_library: PathBuf,
    /// `None`: detected (see `backend::qemu::disk`).
    pub ovmf_code: Option<PathBuf>,
    /// `None`: detected next to the code image.
    pub ovmf_vars: Option<PathBuf>,
    pub public_address: Option<IpAddr>,
    pub qemu_accel: AccelChoice,
    pub qemu_binary: PathBuf,
    /// The unprivileged user QEMU runs as.
    pub qemu_user: String,
    pub run_dir: PathBuf,
    pub service_url: String,
    pub stats_interval: Duration,
    /// Root of every sysfs path the agent reads or writes.
    pub sysfs_root: PathBuf,
    /// `None`: the accelerator's default.
    pub vm_boot_timeout: Option<Duration>,
    pub vm_bandwidth_mbit: Option<u32>,
    pub vm_blocked: Vec<String>,
    pub vm_bridge: String,
    pub vm_conntrack_limit: Option<u32>,
    pub vm_dns: Option<Vec<std::net::Ipv4Addr>>,
    pub vm_subnet: crate::network::Subnet,
    pub container_subnet: crate::network::Subnet,
}

/// Reads values by name; the process environment in production, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

fn setting(name: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} is missing from SETTINGS"))
}

/// Looks up one setting: the value if set and non-empty, else its default.
struct Reader<'a> {
    source: &'a dyn Source,
}

impl Reader<'_> {
    fn raw(&self, name: &'static str) -> Option<String> {
        let value = self.source.get(name).filter(|v| !v.trim().is_empty());
        value.or_else(|| setting(name).default.map(str::to_owned))
    }

    fn error(&self, name: &'static str, value: &str, problem: impl Into<String>) -> ConfigError {
        let s = setting(name);
        let shown = if s.secret { "<redacted>".to_owned() } else { format!("{value:?}") };
        ConfigError { variable: name, shown, problem: problem.into(), accepted: s.accepted }
    }

    fn parse<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.raw(name) {
            None => Ok(None),
            Some(value) => parse(value.trim()).map(Some).map_err(|p| self.error(name, &value, p)),
        }
    }

    fn required<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.parse(name, parse)?.ok_or_else(|| self.error(name, "", "is not set"))
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("is not a boolean".into()),
    }
}

fn parse_port(min: u16) -> impl FnOnce(&str) -> Result<u16, String> {
    move |v| match v.parse::<u32>() {
        Ok(p) if p >= u32::from(min) && p <= 65535 => Ok(p as u16),
        Ok(_) => Err("is out of range".into()),
        Err(_) => Err("is not a port number".into()),
    }
}

/// `first-last`, unprivileged, wide enough for a few instances' ports.
fn parse_port_range(v: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = v.split_once('-').ok_or("is not a range first-last")?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("{p:?} is not a port"));
    let (first, last) = (port(first)?, port(last)?);
    if first < 1024 {
        return Err("starts below 1024".into());
    }
    if last < first || usize::from(last - first) + 1 < 16 {
        return Err("holds fewer than 16 ports".into());
    }
    Ok(first..=last)
}

/// `8G`, `512M`, `1T` (binary units; a plain number is GiB) in MiB, at least 128 MiB.
fn parse_size_mib(v: &str) -> Result<u64, String> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let amount: u64 = v[..split].parse().map_err(|_| "is not a size".to_owned())?;
    let factor = match v[split..].to_ascii_uppercase().as_str() {
        "M" | "MB" | "MIB" => 1,
        "" | "G" | "GB" | "GIB" => 1024,
        "T" | "TB" | "TIB" => 1024 * 1024,
        _ => return Err("is not a size".into()),
    };
    match amount.checked_mul(factor) {
        Some(mib) if mib >= 128 => Ok(mib),
        Some(_) => Err("is below 128M".into()),
        None => Err("is too large".into()),
    }
}

fn parse_abs_path(v: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(v);
    if path.is_absolute() { Ok(path) } else { Err("is not an absolute path".into()) }
}

/// A bare file name for the dynamic loader's search, or an absolute path.
fn parse_library(v: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(v);
    if path.is_absolute() || !v.contains('/') { Ok(path) } else { Err("is a relative path".into()) }
}

/// `unix:///run/docker.sock` or `/run/docker.sock`: only a local socket (the engine's TCP API
/// would be reachable by others on the host).
fn parse_docker_host(v: &str) -> Result<PathBuf, String> {
    let path = v.strip_prefix("unix://").unwrap_or(v);
    if v.contains("://") && !v.starts_with("unix://") {
        return Err("is not a unix:// socket".into());
    }
    parse_abs_path(path)
}

fn parse_url(v: &str) -> Result<String, String> {
    let rest = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"))
        .ok_or("does not start with http:// or https://")?;
    if rest.is_empty() || rest.starts_with('/') || v.chars().any(char::is_whitespace) {
        return Err("has no host".into());
    }
    Ok(v.trim_end_matches('/').to_owned())
}

fn parse_api_key(v: &str) -> Result<Secret, String> {
    if !v.starts_with("ak-") || v.len() < 4 {
        return Err("does not start with `ak-`".into());
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace".into());
    }
    Ok(Secret::new(v))
}

/// `DDDD:BB:DD.F`, hex, lowercased.
pub fn parse_pci_address(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let shape_ok = bytes.len() == 12
        && bytes[4] == b':'
        && bytes[7] == b':'
        && bytes[10] == b'.'
        && bytes.iter().enumerate().all(|(i, b)| matches!(i, 4 | 7 | 10) || b.is_ascii_hexdigit())
        && (b'0'..=b'7').contains(&bytes[11]);
    if shape_ok { Ok(v.to_ascii_lowercase()) } else { Err(format!("{v:?} is not a PCI address")) }
}

fn parse_registry_list(v: &str) -> Result<Vec<String>, String> {
    let host = |c: char| c.is_ascii_alphanumeric() || ".-:[]".contains(c);
    let parts: Vec<String> =
        v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect();
    match parts.iter().find(|p| !p.chars().all(host) || p.starts_with('-')) {
        Some(bad) => Err(format!("{bad:?} is not a registry host[:port]")),
        None => Ok(parts),
    }
}

fn parse_pci_list(v: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr = parse_pci_address(part)?;
        if out.contains(&addr) {
            return Err(format!("{addr} is listed twice"));
        }
        out.push(addr);
    }
    if out.is_empty() { Err("lists no address".into()) } else { Ok(out) }
}

/// `none` (nothing kept for the host) or a CPU list in the kernel's format.
fn parse_cpu_list(v: &str) -> Result<Vec<u32>, String> {
    if v.trim() == "none" {
        return Ok(Vec::new());
    }
    match crate::backend::qemu::topology::cpulist::parse(v) {
        Some(cpus) if !cpus.is_empty() => Ok(cpus),
        Some(_) => Err("lists no CPU".into()),
        None => Err("is not a CPU list".into()),
    }
}

/// A DNS label as FRP accepts it for a subdomain.
pub fn is_dns_label(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

fn parse_host(v: &str) -> Result<String, String> {
    let ok = v.parse::<IpAddr>().is_ok() || (v.len() <= 253 && v.split('.').all(is_dns_label));
    if ok { Ok(v.to_owned()) } else { Err("is not a host name or IP address".into()) }
}

impl Config {
    /// Reads and validates every setting. `local` relaxes what local mode does not need.
    pub fn load(source: &dyn Source, local: bool) -> Result<Config, ConfigError> {
        let r = Reader { source };
        let api_key = if local {
            r.parse("QUDATA_API_KEY", parse_api_key)?
        } else {
            Some(r.required("QUDATA_API_KEY", parse_api_key)?)
        };
        let backend = r.required("QUDATA_BACKEND", |v| match v {
            "auto" => Ok(BackendChoice::Auto),
            "qemu" => Ok(BackendChoice::Qemu),
            "docker" => Ok(BackendChoice::Docker),
            _ => Err("is not a known backend".into()),
        })?;
        let interval_ms = r.required("QUDATA_STATS_INTERVAL_MS", |v| match v.parse::<u64>() {
            Ok(ms) if (100..=60_000).contains(&ms) => Ok(ms),
            Ok(_) => Err("is out of range".into()),
            Err(_) => Err("is not a number".into()),
        })?;
        Ok(Config {
            api_key,
            agent_port: r.parse("QUDATA_AGENT_PORT", parse_port(1024))?,
            backend,
            base_image: r.parse("QUDATA_BASE_IMAGE", parse_abs_path)?,
            data_dir: r.required("QUDATA_DATA_DIR", parse_abs_path)?,
            debug: r.required("QUDATA_DEBUG", parse_bool)?,
            docker_host: r.required("QUDATA_DOCKER_HOST", parse_docker_host)?,
            docker_unlimited_disk: r.required("QUDATA_DOCKER_UNLIMITED_DISK", parse_bool)?,
            docker_private_registries: r
                .parse("QUDATA_DOCKER_PRIVATE_REGISTRIES", parse_registry_list)?
                .unwrap_or_default(),
            docker_pull: r.required("QUDATA_DOCKER_PULL", |v| {
                crate::backend::docker::pull::PullPolicy::parse(v.trim())
            })?,
            frpc_binary: r.required("QUDATA_FRPC_BINARY", |v| Ok(PathBuf::from(v)))?,
            frpc_config: r.required("QUDATA_FRPC_CONFIG", parse_abs_path)?,
            frp: FrpOverrides {
                server: r.parse("QUDATA_FRP_SERVER", parse_host)?,
                port: r.parse("QUDATA_FRP_PORT", parse_port(1))?,
                token: r.parse("QUDATA_FRP_TOKEN", |v| Ok(Secret::new(v)))?,
                subdomain: r.parse("QUDATA_FRP_SUBDOMAIN", |v| {
                    if is_dns_label(v) {
                        Ok(v.to_owned())
                    } else {
                        Err("is not a DNS label".into())
                    }
                })?,
            },
            gpu_pci_addrs: r.parse("QUDATA_GPU_PCI_ADDRS", parse_pci_list)?,
            host_ports: r.required("QUDATA_HOST_PORTS", parse_port_range)?,
            host_reserved_cpus: r.parse("QUDATA_HOST_RESERVED_CPUS", parse_cpu_list)?,
            instance_cpus: r.parse("QUDATA_INSTANCE_CPUS", |v| match v.parse::<u32>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(n),
                Ok(_) => Err("is out of range".into()),
                Err(_) => Err("is not a number".into()),
            })?,
            instance_memory_mib: r.parse("QUDATA_INSTANCE_MEMORY", parse_size_mib)?,
            kmsg_path: r.required("QUDATA_KMSG_PATH", parse_abs_path)?,
            nvml_library: r.required("QUDATA_NVML_LIBRARY", parse_library)?,
            ovmf_code: r.parse("QUDATA_OVMF_CODE", parse_abs_path)?,
            ovmf_vars: r.parse("QUDATA_OVMF_VARS", parse_abs_path)?,
            public_address: r.parse("QUDATA_PUBLIC_ADDRESS", |v| {
                v.parse::<IpAddr>().map_err(|_| "is not an IP address".into())
            })?,
            qemu_accel: r.required("QUDATA_QEMU_ACCEL", |v| match v {
                "auto" => Ok(AccelChoice::Auto),
                "kvm" => Ok(AccelChoice::Kvm),
                "tcg" => Ok(AccelChoice::Tcg),
                _ => Err("is not a known accelerator".into()),
            })?,
            qemu_binary: r.required("QUDATA_QEMU_BINARY", |v| Ok(PathBuf::from(v)))?,
            qemu_user: r.required("QUDATA_QEMU_USER", |v| Ok(v.trim().to_owned()))?,
            run_dir: r.required("QUDATA_RUN_DIR", parse_abs_path)?,
            service_url: r.required("QUDATA_SERVICE_URL", parse_url)?,
            stats_interval: Duration::from_millis(interval_ms),
            sysfs_root: r.required("QUDATA_SYSFS_ROOT", parse_abs_path)?,
            vm_boot_timeout: r.parse("QUDATA_VM_BOOT_TIMEOUT", |v| match v.parse::<u64>() {
                Ok(s) if (10..=3600).contains(&s) => Ok(Duration::from_secs(s)),
                Ok(_) => Err("is out of range".into()),
                Err(_) => Err("is not a number".into()),
            })?,
            vm_bandwidth_mbit: r.parse("QUDATA_VM_BANDWIDTH_MBIT", parse_in(1, 100_000))?,
            vm_blocked: r
                .parse("QUDATA_VM_BLOCKED", |v| {
                    v.split(',').map(str::trim).map(crate::network::parse_cidr).collect()
                })?
                .unwrap_or_default(),
            vm_bridge: r.required("QUDATA_VM_BRIDGE", |v| {
                crate::network::check_bridge_name(v).map(|()| v.to_owned())
            })?,
            vm_conntrack_limit: r.parse("QUDATA_VM_CONNTRACK_LIMIT", parse_in(16, 10_000_000))?,
            vm_dns: r.parse("QUDATA_VM_DNS", parse_ipv4_list)?,
            vm_subnet: r.required("QUDATA_VM_SUBNET", |v| v.parse())?,
            container_subnet: r.required("QUDATA_CONTAINER_SUBNET", |v| v.parse())?,
        })
    }
}

/// A whole number in `min..=max`.
fn parse_in(min: u32, max: u32) -> impl FnOnce(&str) -> Result<u32, String> {
    move |v| match v.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err("is out of range".into()),
        Err(_) => Err("is not a number".into()),
    }
}

fn parse_ipv4_list(v: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let list: Vec<_> = v
        .split(',')
        .map(str::trim)
        .map(|a| a.parse().map_err(|_| format!("{a:?} is not an IPv4 address")))
        .collect::<Result<_, _>>()?;
    if list.is_empty() { Err("names no server".into()) } else { Ok(list) }
}

/// The `--help` footer of a command: every variable it reads, with its default.
pub fn help_text(scopes: &[Scope]) -> String {
    let mut out = String::from("Environment:\n");
    for s in SETTINGS.iter().filter(|s| scopes.contains(&s.scope)) {
        let default = s.default.map(|d| format!(" [default: {d}]")).unwrap_or_default();
        out.push_str(&format!("  {:<26} {}{}\n", s.name, s.help, default));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn table_is_sorted_and_unique() {
        let names: Vec<_> = SETTINGS.iter().map(|s| s.name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted);
    }

    #[test]
    fn defaults_apply_in_local_mode() {
        let c = Config::load(&env(&[]), true).unwrap();
        assert!(c.api_key.is_none());
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/qudata"));
        assert_eq!(c.run_dir, PathBuf::from("/run/qudata"));
        assert_eq!(c.stats_interval, Duration::from_millis(500));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.service_url, "https://internal.qudata.ai/v0");
        assert_eq!(c.qemu_accel, AccelChoice::Auto);
        assert_eq!(c.qemu_binary, PathBuf::from("qemu-system-x86_64"));
        assert!(c.ovmf_code.is_none() && c.ovmf_vars.is_none());
        assert_eq!(c.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(c.nvml_library, PathBuf::from("libnvidia-ml.so.1"));
    }

    #[test]
    fn qemu_settings_are_read() {
        let c = Config::load(
            &env(&[
                ("QUDATA_QEMU_ACCEL", "tcg"),
                ("QUDATA_QEMU_BINARY", "/opt/qemu/bin/qemu-system-x86_64"),
                ("QUDATA_OVMF_CODE", "/fw/CODE.fd"),
                ("QUDATA_OVMF_VARS", "/fw/VARS.fd"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(c.qemu_accel, AccelChoice::Tcg);
        assert_eq!(c.qemu_binary, PathBuf::from("/opt/qemu/bin/qemu-system-x86_64"));
        assert_eq!(c.ovmf_code, Some(PathBuf::from("/fw/CODE.fd")));
        assert_eq!(c.ovmf_vars, Some(PathBuf::from("/fw/VARS.fd")));
        let kvm = Config::load(&env(&[("QUDATA_QEMU_ACCEL", "kvm")]), true).unwrap();
        assert_eq!(kvm.qemu_accel, AccelChoice::Kvm);
    }

    #[test]
    fn host_reserved_cpus_are_a_cpu_list_or_none() {
        let load = |v: &str| Config::load(&env(&[("QUDATA_HOST_RESERVED_CPUS", v)]), true);
        assert_eq!(Config::load(&env(&[]), true).unwrap().host_reserved_cpus, None);
        assert_eq!(load("0,64").unwrap().host_reserved_cpus, Some(vec![0, 64]));
        assert_eq!(load("0-1,32-33").unwrap().host_reserved_cpus, Some(vec![0, 1, 32, 33]));
        assert_eq!(load("none").unwrap().host_reserved_cpus, Some(vec![]));
        let err = load("first").unwrap_err().to_string();
        assert!(err.starts_with("QUDATA_HOST_RESERVED_CPUS=\"first\": is not a CPU list"), "{err}");
    }

    #[test]
    fn host_ports_are_a_range_below_the_ephemeral_one_by_default() {
        assert_eq!(Config::load(&env(&[]), true).unwrap().host_ports, crate::ports::HOST_PORTS);
        let set = env(&[("QUDATA_HOST_PORTS", " 24000 - 24015 ")]);
        assert_eq!(Config::load(&set, true).unwrap().host_ports, 24000..=24015);
    }

    #[test]
    fn docker_pull_is_always_unless_missing() {
        use crate::backend::docker::pull::PullPolicy;
        assert_eq!(Config::load(&env(&[]), true).unwrap().docker_pull, PullPolicy::Always);
        let load = |v: &str| Config::load(&env(&[("QUDATA_DOCKER_PULL", v)]), true);
        assert_eq!(load("missing").unwrap().docker_pull, PullPolicy::Missing);
        assert_eq!(load("always").unwrap().docker_pull, PullPolicy::Always);
        let err = load("never").unwrap_err().to_string();
        assert!(err.starts_with("QUDATA_DOCKER_PULL=\"never\": is not a pull policy"), "{err}");
    }

    #[test]
    fn docker_host_is_a_local_socket() {
        let c = Config::load(&env(&[]), true).unwrap();
        assert_eq!(c.docker_host, PathBuf::from("/var/run/docker.sock"));
        let set = env(&[("QUDATA_DOCKER_HOST", "unix:///tmp/d/docker.sock")]);
        assert_eq!(
            Config::load(&set, true).unwrap().docker_host,
            PathBuf::from("/tmp/d/docker.sock")
        );
        for bad in ["tcp://127.0.0.1:2375", "unix://relative.sock", "docker.sock"] {
            let err = Config::load(&env(&[("QUDATA_DOCKER_HOST", bad)]), true).unwrap_err();
            assert_eq!(err.variable, "QUDATA_DOCKER_HOST", "{bad}");
        }
    }

    #[test]
    fn api_key_is_required_outside_local_mode() {
        let err = Config::load(&env(&[]), false).unwrap_err();
        assert_eq!(err.variable, "QUDATA_API_KEY");
        assert!(err.to_string().contains("is not set"), "{err}");
    }

    #[test]
    fn bad_api_key_is_refused_without_echoing_it() {
        let err = Config::load(&env(&[("QUDATA_API_KEY", "sk-leak-me")]), false).unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("QUDATA_API_KEY=<redacted>: does not start with `ak-`"), "{line}");
        assert!(!line.contains("leak-me"));
    }

    #[test]
    fn each_bad_value_names_variable_and_accepted_values() {
        let cases = [
            ("QUDATA_AGENT_PORT", "80"),
            ("QUDATA_AGENT_PORT", "port"),
            ("QUDATA_BACKEND", "kvm"),
            ("QUDATA_DATA_DIR", "relative/dir"),
            ("QUDATA_DEBUG", "maybe"),
            ("QUDATA_FRP_PORT", "70000"),
            ("QUDATA_FRP_SERVER", "bad host!"),
            ("QUDATA_FRP_SUBDOMAIN", "-x-"),
            ("QUDATA_GPU_PCI_ADDRS", "65:00.0"),
            ("QUDATA_GPU_PCI_ADDRS", "0000:65:00.0,0000:65:00.0"),
            ("QUDATA_NVML_LIBRARY", "lib/libnvidia-ml.so.1"),
            ("QUDATA_OVMF_CODE", "OVMF_CODE.fd"),
            ("QUDATA_OVMF_VARS", "vars.fd"),
            ("QUDATA_PUBLIC_ADDRESS", "1.2.3"),
            ("QUDATA_QEMU_ACCEL", "hvf"),
            ("QUDATA_SERVICE_URL", "ftp://x"),
            ("QUDATA_STATS_INTERVAL_MS", "5"),
            ("QUDATA_SYSFS_ROOT", "sys"),
            ("QUDATA_INSTANCE_CPUS", "0"),
            ("QUDATA_INSTANCE_MEMORY", "64M"),
            ("QUDATA_INSTANCE_MEMORY", "8X"),
            ("QUDATA_VM_BOOT_TIMEOUT", "5"),
            ("QUDATA_HOST_PORTS", "20000"),
            ("QUDATA_HOST_PORTS", "80-2000"),
            ("QUDATA_HOST_PORTS", "30000-30009"),
            ("QUDATA_HOST_PORTS", "30000-29000"),
            ("QUDATA_HOST_PORTS", "30000-70000"),
        ];
        for (name, value) in cases {
            let err = Config::load(&env(&[(name, value)]), true).unwrap_err();
            assert_eq!(err.variable, name, "{value}");
            let line = err.to_string();
            assert!(line.contains("accepted: "), "{line}");
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn values_are_normalised() {
        let c = Config::load(
            &env(&[
                ("QUDATA_API_KEY", "ak-123"),
                ("QUDATA_SERVICE_URL", "http://127.0.0.1:9/v0/"),
                ("QUDATA_GPU_PCI_ADDRS", "0000:65:00.0, 0000:B3:00.0"),
                ("QUDATA_DEBUG", "YES"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(c.service_url, "http://127.0.0.1:9/v0");
        assert_eq!(c.gpu_pci_addrs.unwrap(), ["0000:65:00.0", "0000:b3:00.0"]);
        assert!(c.debug);
        assert_eq!(c.api_key.unwrap().expose(), "ak-123");
    }

    #[test]
    fn frpc_config_defaults_and_must_be_absolute() {
        let c = Config::load(&env(&[]), true).unwrap();
        assert_eq!(c.frpc_config, PathBuf::from("/etc/qudata/frpc.toml"));
        let err = Config::load(&env(&[("QUDATA_FRPC_CONFIG", "frpc.toml")]), true).unwrap_err();
        assert_eq!(err.variable, "QUDATA_FRPC_CONFIG");
    }

    #[test]
    fn help_lists_variables_of_the_scope() {
        let run = help_text(&[Scope::Run, Scope::Host]);
        let host = help_text(&[Scope::Host]);
        assert!(run.contains("QUDATA_API_KEY") && run.contains("QUDATA_DATA_DIR"));
        assert!(!host.contains("QUDATA_API_KEY") && host.contains("QUDATA_DATA_DIR"));
    }
}
