//! QEMU, qemu-img, OVMF firmware, frpc and its server credentials.

use std::path::Path;

use super::exec::{find_program, version_line};
use super::{Check, HostView, Need, Status};
use crate::control_plane::identity::FrpCredentials;

/// OVMF code + vars pairs, in order of preference (Debian 12 ships the 4M ones).
pub const OVMF_PAIRS: &[(&str, &str)] =
    &[("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")];

pub fn qemu(view: &HostView) -> Check {
    program(view, "qemu", "qemu-system-x86_64", "apt-get install qemu-system-x86")
}

pub fn qemu_img(view: &HostView) -> Check {
    program(view, "qemu-img", "qemu-img", "apt-get install qemu-utils")
}

/// A VM tool on the `PATH`, with the version it reports.
fn program(view: &HostView, check: &'static str, name: &str, install: &str) -> Check {
    let missing = view.missing(Need::Vm);
    let Some(path) = find_program(Path::new(name), &view.search_path) else {
        return Check::new(check, missing, format!("{name} is not on PATH"), install);
    };
    match version_line(&path, view.command_timeout) {
        Ok(version) => Check::ok(check, format!("{version} ({})", path.display())),
        Err(e) => Check::new(check, missing, e.to_string(), install),
    }
}

/// What the VMs' network needs (`network`): nftables, dnsmasq, conntrack, iproute2 and the tun
/// device.
pub fn vm_network(view: &HostView) -> Check {
    let needed = [
        ("nft", "nftables"),
        ("dnsmasq", "dnsmasq-base"),
        ("conntrack", "conntrack"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(program, _)| find_program(Path::new(program), &view.search_path).is_none())
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        let mut packages = missing.clone();
        packages.dedup();
        let detail = format!("missing: {}", packages.join(", "));
        return Check::new(
            "vm-network",
            view.missing(Need::Vm),
            detail,
            format!("apt-get install {}", packages.join(" ")),
        );
    }
    if !Path::new("/dev/net/tun").exists() {
        let fix = "load the tun module (modprobe tun)";
        return Check::new("vm-network", view.missing(Need::Vm), "no /dev/net/tun", fix);
    }
    let vhost =
        if Path::new("/dev/vhost-net").exists() { "vhost-net" } else { "no vhost-net (slower)" };
    Check::ok("vm-network", format!("nft, dnsmasq, conntrack, ip, tc, /dev/net/tun; {vhost}"))
}

/// UEFI firmware for the VMs: a code file and the vars template it pairs with.
pub fn ovmf(view: &HostView) -> Check {
    for (code, vars) in OVMF_PAIRS {
        let (code, vars) = (view.ovmf_dir.join(code), view.ovmf_dir.join(vars));
        if code.is_file() && vars.is_file() {
            return Check::ok("ovmf", format!("{} + {}", code.display(), vars.display()));
        }
    }
    let names: Vec<&str> = OVMF_PAIRS.iter().flat_map(|(c, v)| [*c, *v]).collect();
    let found: Vec<&str> =
        names.iter().copied().filter(|n| view.ovmf_dir.join(n).is_file()).collect();
    let detail = if found.is_empty() {
        format!("no OVMF firmware in {}", view.ovmf_dir.display())
    } else {
        format!("{} holds {} but no code + vars pair", view.ovmf_dir.display(), found.join(", "))
    };
    Check::new("ovmf", view.missing(Need::Vm), detail, "apt-get install ovmf")
}

/// The frp client every published port goes through (not needed with `--local`).
pub fn frpc(view: &HostView) -> Check {
    let fix = "install frpc or set QUDATA_FRPC_BINARY (not needed with --local)";
    let Some(path) = find_program(&view.frpc_binary, &view.search_path) else {
        let detail =
            format!("{} is not on PATH nor an executable file", view.frpc_binary.display());
        return Check::new("frpc", Status::Fail, detail, fix);
    };
    match version_line(&path, view.command_timeout) {
        Ok(version) => Check::ok("frpc", format!("frpc {version} ({})", path.display())),
        Err(e) => Check::new("frpc", Status::Warn, e.to_string(), fix),
    }
}

/// The FRP server credentials frpc needs: stored by the last `/init`, or the `QUDATA_FRP_*`
/// overrides. Missing before the first registration is normal (`warn`), but until then
/// frpc is not started and nothing is published. The token is never shown.
pub fn frp_credentials(view: &HostView) -> Check {
    let stored = match FrpCredentials::load_stored(&view.data_dir) {
        Ok(stored) => stored,
        Err(e) => return Check::new("frp", Status::Fail, e.to_string(), "see the detail"),
    };
    let creds = stored.with_overrides(&view.frp_overrides);
    let mut missing = Vec::new();
    if creds.server_addr.is_none() {
        missing.push("server");
    }
    if creds.server_port.is_none() {
        missing.push("port");
    }
    if creds.token.is_none() {
        missing.push("token");
    }
    if missing.is_empty() {
        let (addr, port) = (creds.server_addr.unwrap_or_default(), creds.server_port.unwrap_or(0));
        return Check::ok("frp", format!("server {addr}:{port}, token set"));
    }
    let detail = format!(
        "no FRP {}: frpc is not started and nothing is published until /init sends them",
        missing.join(", ")
    );
    let fix = "run the agent with QUDATA_API_KEY, or set QUDATA_FRP_SERVER, QUDATA_FRP_PORT and QUDATA_FRP_TOKEN";
    Check::new("frp", Status::Warn, detail, fix)
}
