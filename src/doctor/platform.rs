//! CPU virtualization, KVM, IOMMU and the VFIO modules.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use super::{AccelView, Check, HostView, Need, Status};
use crate::backend::qemu::accel::Accel;
use crate::config::AccelChoice;

/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)` with `KVMIO` = 0xAE.
const KVM_GET_API_VERSION: libc::Ioctl = 0xAE00;
/// The only KVM API version Linux has ever reported.
const KVM_API_VERSION: i32 = 12;

/// The modules VFIO passthrough needs.
pub const VFIO_MODULES: &[&str] = &["vfio", "vfio_pci", "vfio_iommu_type1"];

/// Hardware virtualization flags in `/proc/cpuinfo`.
pub fn cpu(view: &HostView) -> Check {
    let path = view.proc_root.join("cpuinfo");
    let cpuinfo = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            let detail = format!("cannot read {}: {e}", path.display());
            return Check::new("cpu", Status::Warn, detail, "mount /proc");
        }
    };
    match virtualization_flag(&cpuinfo) {
        Some("vmx") => Check::ok("cpu", "Intel VT-x (vmx)"),
        Some(_) => Check::ok("cpu", "AMD-V (svm)"),
        None => Check::new(
            "cpu",
            Status::Warn,
            "no vmx/svm flag in /proc/cpuinfo: VMs run under TCG (slow)",
            "enable VT-x/AMD-V in the firmware setup",
        ),
    }
}

/// `vmx` or `svm` when a `flags` line of cpuinfo lists it.
pub fn virtualization_flag(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .flat_map(|(_, flags)| flags.split_whitespace());
    for flag in flags {
        match flag {
            "vmx" => return Some("vmx"),
            "svm" => return Some("svm"),
            _ => {}
        }
    }
    None
}

/// `QUDATA_HOST_PORTS` against the kernel's ephemeral range: a port the kernel may hand to an
/// outgoing connection can be taken while its instance is stopped.
pub fn host_ports(view: &HostView) -> Check {
    use crate::ports::ephemeral::{self, Verdict};
    let range = &view.host_ports;
    match ephemeral::judge(&view.proc_root, range) {
        Ok(Verdict::Clear { ephemeral }) => Check::ok(
            "host-ports",
            format!(
                "{}-{}: the kernel hands none to outgoing connections (ephemeral range {}-{})",
                range.start(),
                range.end(),
                ephemeral.start(),
                ephemeral.end()
            ),
        ),
        Ok(Verdict::Exposed { problem, fix }) => Check::new(
            "host-ports",
            Status::Warn,
            problem,
            format!("{fix} (and in /etc/sysctl.d), or move QUDATA_HOST_PORTS"),
        ),
        Err(e) => Check::new("host-ports", Status::Warn, e.to_string(), "mount /proc"),
    }
}

/// `/dev/kvm` exists, opens read-write and answers `KVM_GET_API_VERSION` with 12.
pub fn kvm(view: &HostView) -> Check {
    let path = view.dev_root.join("kvm");
    let missing = view.missing(Need::Vm);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let detail = format!("{} does not exist: VMs run under TCG (slow)", path.display());
            return Check::new("kvm", missing, detail, "modprobe kvm_intel or kvm_amd");
        }
        Err(e) => {
            let detail = format!("cannot open {} read-write: {e}", path.display());
            return Check::new("kvm", missing, detail, "run the agent as root");
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value; the fd is valid
    // for the duration of the call because `file` is alive.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version < 0 {
        let err = std::io::Error::last_os_error();
        let detail = format!("{} opens but is not KVM ({err})", path.display());
        return Check::new("kvm", missing, detail, "make /dev/kvm the char device 10:232");
    }
    if version != KVM_API_VERSION {
        let detail = format!("{} reports KVM API version {version}, not 12", path.display());
        return Check::new("kvm", missing, detail, "use a mainline Linux kernel");
    }
    Check::ok(
        "kvm",
        format!(
            "{} opens, API version 12 (opening is not enough: a probe guest at run time \
             decides KVM or TCG)",
            path.display()
        ),
    )
}

/// KVM or TCG, and why: the decision `run` makes (see [`super::decide_accel`]).
pub fn accel(view: &HostView) -> Check {
    let fix_kvm = "fix KVM (on a nested host: nested virtualisation in the outer host, or a \
                   newer outer kernel), then reboot; until then VMs are slow and get no GPUs";
    match &view.accel {
        AccelView::Decided { decision, .. } if decision.accel == Accel::Kvm => {
            Check::ok("accel", format!("KVM: {}", decision.reason))
        }
        AccelView::Decided { decision, choice: AccelChoice::Tcg } => Check::new(
            "accel",
            Status::Warn,
            format!("TCG: {} (VMs are many times slower and get no GPUs)", decision.reason),
            "set QUDATA_QEMU_ACCEL=auto where KVM works",
        ),
        // VMs still run (slowly, without GPUs): a warning, whatever the backend.
        AccelView::Decided { decision, .. } => {
            Check::new("accel", Status::Warn, format!("TCG: {}", decision.reason), fix_kvm)
        }
        AccelView::Refused(why) => Check::new("accel", Status::Fail, why.clone(), fix_kvm),
        AccelView::Undecided(why) => Check::new(
            "accel",
            view.missing(Need::Vm),
            why.clone(),
            "fix the qemu and ovmf lines above",
        ),
    }
}

/// IOMMU options of the kernel command line.
pub fn iommu_cmdline_options(cmdline: &str) -> Vec<&str> {
    cmdline
        .split_whitespace()
        .take_while(|t| *t != "--")
        .filter(|t| {
            t.starts_with("intel_iommu=") || t.starts_with("amd_iommu=") || t.starts_with("iommu=")
        })
        .collect()
}

/// The kernel made IOMMU groups (and what the command line asked for).
pub fn iommu(view: &HostView) -> Check {
    let cmdline = std::fs::read_to_string(view.proc_root.join("cmdline")).unwrap_or_default();
    let options = iommu_cmdline_options(&cmdline);
    let asked = options.iter().any(|o| *o == "intel_iommu=on" || *o == "amd_iommu=on");
    let shown = if options.is_empty() { "no IOMMU options".to_owned() } else { options.join(" ") };
    let groups = match view.sysfs.iommu_groups() {
        Ok(groups) => groups,
        Err(e) => return Check::new("iommu", Status::Fail, e.to_string(), "mount sysfs on /sys"),
    };
    let missing = view.missing(Need::Vm);
    if !groups.is_empty() {
        let n = groups.len();
        let plural = if n == 1 { "" } else { "s" };
        Check::ok("iommu", format!("{n} IOMMU group{plural}; cmdline: {shown}"))
    } else if asked {
        let detail = format!("cmdline has {shown} but the kernel made no IOMMU groups");
        Check::new("iommu", missing, detail, "enable VT-d/AMD-Vi in the firmware setup")
    } else {
        Check::new(
            "iommu",
            missing,
            format!("no IOMMU groups (cmdline: {shown}): GPUs go to Docker only, not VMs"),
            "boot with intel_iommu=on iommu=pt (see grub/), enable VT-d/AMD-Vi",
        )
    }
}

/// The VFIO modules are loaded or built into the kernel.
pub fn vfio_modules(view: &HostView) -> Check {
    let builtin = builtin_modules(view);
    let mut present = Vec::new();
    let mut absent = Vec::new();
    for module in VFIO_MODULES {
        if view.sysfs.module_loaded(module) {
            present.push((*module).to_owned());
        } else if builtin.iter().any(|b| b == module) {
            present.push(format!("{module} (built in)"));
        } else {
            absent.push(*module);
        }
    }
    if absent.is_empty() {
        return Check::ok("vfio", format!("loaded: {}", present.join(", ")));
    }
    Check::new(
        "vfio",
        view.missing(Need::Vm),
        format!("not loaded: {}", absent.join(", ")),
        "modprobe vfio-pci; list it in /etc/modules-load.d/",
    )
}

/// Module names (`-` read as `_`) of `/lib/modules/<release>/modules.builtin`.
fn builtin_modules(view: &HostView) -> Vec<String> {
    let release = std::fs::read_to_string(view.proc_root.join("sys/kernel/osrelease"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if release.is_empty() {
        return Vec::new();
    }
    let list = view.lib_modules.join(release).join("modules.builtin");
    std::fs::read_to_string(list)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|name| name.strip_suffix(".ko"))
        .map(|name| name.replace('-', "_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_virtualization_flag() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let amd = "flags\t\t: fpu svm\n";
        let none = "flags\t\t: fpu hypervisor\nvmx flags\t: ept\n";
        assert_eq!(virtualization_flag(intel), Some("vmx"));
        assert_eq!(virtualization_flag(amd), Some("svm"));
        assert_eq!(virtualization_flag(none), None, "`vmx flags` names are not flags");
    }

    #[test]
    fn reads_iommu_options_of_the_kernel_only() {
        let cmdline = "BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt quiet -- amd_iommu=on\n";
        assert_eq!(iommu_cmdline_options(cmdline), ["intel_iommu=on", "iommu=pt"]);
        assert!(iommu_cmdline_options("ro quiet").is_empty());
    }
}

#[cfg(test)]
mod accel_tests {
    use super::*;
    use crate::backend::qemu::accel::Decision;
    use crate::config::BackendChoice;

    fn view(accel: AccelView, backend: BackendChoice) -> HostView {
        HostView { accel, ..HostView::under(std::path::Path::new("/nonexistent"), backend) }
    }

    fn decided(accel: Accel, reason: &str, choice: AccelChoice) -> AccelView {
        AccelView::Decided { decision: Decision { accel, reason: reason.into() }, choice }
    }

    #[test]
    fn the_accel_line_shows_the_decision_and_its_reason() {
        let auto = BackendChoice::Auto;
        let kvm = accel(&view(decided(Accel::Kvm, "the probe ran", AccelChoice::Auto), auto));
        assert_eq!((kvm.status, kvm.detail.as_str()), (Status::Ok, "KVM: the probe ran"));
        let broken = "KVM cannot run guests on this host: KVM internal error (emulation failure)";
        let tcg = accel(&view(decided(Accel::Tcg, broken, AccelChoice::Auto), auto));
        assert_eq!(tcg.status, Status::Warn);
        assert_eq!(tcg.detail, format!("TCG: {broken}"));
        assert!(tcg.fix.unwrap().starts_with("fix KVM"));
        // VMs still run under TCG, so even the qemu backend only warns.
        let qemu = view(decided(Accel::Tcg, broken, AccelChoice::Auto), BackendChoice::Qemu);
        assert_eq!(accel(&qemu).status, Status::Warn);
        let asked = decided(Accel::Tcg, "QUDATA_QEMU_ACCEL=tcg", AccelChoice::Tcg);
        let asked = accel(&view(asked, auto));
        assert_eq!(asked.status, Status::Warn);
        assert!(asked.detail.starts_with("TCG: QUDATA_QEMU_ACCEL=tcg"), "{}", asked.detail);
        let refused = AccelView::Refused("QUDATA_QEMU_ACCEL=kvm but the probe failed".into());
        assert_eq!(accel(&view(refused, auto)).status, Status::Fail);
        let undecided = AccelView::Undecided("cannot probe: no OVMF".into());
        let undecided = accel(&view(undecided, BackendChoice::Qemu));
        assert_eq!(undecided.status, Status::Fail, "the qemu backend cannot run at all");
        assert_eq!(undecided.detail, "cannot probe: no OVMF");
    }
}
