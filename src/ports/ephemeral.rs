//! The kernel's own use of port numbers: every outgoing connection takes a local port from
//! `net.ipv4.ip_local_port_range` (skipping `ip_local_reserved_ports`). A host port of ours in
//! that range can be taken by any client on the host while its instance is stopped (or before
//! its forward opens), and the next start then fails with "address in use". The default range
//! lies below Linux's default ephemeral range; this says when a host's settings undo that.

use std::ops::RangeInclusive;
use std::path::Path;

/// What `/proc/sys/net/ipv4` says about automatic port assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPorts {
    pub ephemeral: RangeInclusive<u16>,
    pub reserved: Vec<RangeInclusive<u16>>,
}

impl KernelPorts {
    /// Reads `ip_local_port_range` and `ip_local_reserved_ports` under `proc_root`.
    pub fn read(proc_root: &Path) -> Result<KernelPorts, String> {
        let dir = proc_root.join("sys/net/ipv4");
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| format!("cannot read {}: {e}", dir.join(name).display()))
        };
        let range = read("ip_local_port_range")?;
        let ephemeral = parse_port_range(&range)
            .ok_or_else(|| format!("ip_local_port_range is unreadable: {:?}", range.trim()))?;
        // Older kernels and some containers have no reserved list: nothing is reserved.
        let reserved = match read("ip_local_reserved_ports") {
            Ok(text) => parse_reserved(&text).ok_or_else(|| {
                format!("ip_local_reserved_ports is unreadable: {:?}", text.trim())
            })?,
            Err(_) => Vec::new(),
        };
        Ok(KernelPorts { ephemeral, reserved })
    }

    /// How many ports of `host` the kernel may hand to an outgoing connection.
    pub fn exposed(&self, host: &RangeInclusive<u16>) -> usize {
        host.clone()
            .filter(|p| self.ephemeral.contains(p))
            .filter(|p| !self.reserved.iter().any(|r| r.contains(p)))
            .count()
    }
}

/// `ip_local_port_range`: two numbers separated by white space.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u16>().ok());
    let (Some(Some(first)), Some(Some(last)), None) = (fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    (first <= last).then_some(first..=last)
}

/// `ip_local_reserved_ports`: `8080,9148-9150`, or empty.
fn parse_reserved(text: &str) -> Option<Vec<RangeInclusive<u16>>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|item| match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
                (a <= b).then_some(a..=b)
            }
            None => item.trim().parse::<u16>().ok().map(|p| p..=p),
        })
        .collect()
}

/// The warning for a host whose kernel may take our ports, with the fix; `None` when it cannot.
pub fn warning(host: &RangeInclusive<u16>, kernel: &KernelPorts) -> Option<String> {
    let exposed = kernel.exposed(host);
    (exposed > 0).then(|| {
        format!(
            "{exposed} of the host ports {}-{} (QUDATA_HOST_PORTS) lie in the kernel's ephemeral \
             range {}-{} unreserved: an outgoing connection can take one while its instance is \
             stopped, and the instance then cannot start",
            host.start(),
            host.end(),
            kernel.ephemeral.start(),
            kernel.ephemeral.end()
        )
    })
}

/// The sysctl that keeps the kernel off `host`, keeping what is reserved already.
pub fn reserve_command(host: &RangeInclusive<u16>, kernel: &KernelPorts) -> String {
    let mut items: Vec<String> = kernel
        .reserved
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect();
    items.push(format!("{}-{}", host.start(), host.end()));
    format!("sysctl -w net.ipv4.ip_local_reserved_ports={}", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(ephemeral: RangeInclusive<u16>, reserved: Vec<RangeInclusive<u16>>) -> KernelPorts {
        KernelPorts { ephemeral, reserved }
    }

    #[test]
    fn reads_the_kernels_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/net/ipv4");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ip_local_port_range"), "32768\t60999\n").unwrap();
        std::fs::write(dir.join("ip_local_reserved_ports"), "8080,9148-9150\n").unwrap();
        let got = KernelPorts::read(root.path()).unwrap();
        assert_eq!(got, kernel(32768..=60999, vec![8080..=8080, 9148..=9150]));

        std::fs::write(dir.join("ip_local_reserved_ports"), "\n").unwrap();
        assert_eq!(KernelPorts::read(root.path()).unwrap().reserved, vec![]);
        std::fs::remove_file(dir.join("ip_local_reserved_ports")).unwrap();
        assert_eq!(KernelPorts::read(root.path()).unwrap().reserved, vec![]);

        std::fs::write(dir.join("ip_local_port_range"), "60999 32768\n").unwrap();
        let err = KernelPorts::read(root.path()).unwrap_err();
        assert!(err.contains("unreadable"), "{err}");
        std::fs::remove_file(dir.join("ip_local_port_range")).unwrap();
        assert!(KernelPorts::read(root.path()).unwrap_err().contains("cannot read"));
    }

    #[test]
    fn reads_this_hosts_kernel() {
        let got = KernelPorts::read(Path::new("/proc")).unwrap();
        assert!(got.ephemeral.start() <= got.ephemeral.end());
    }

    #[test]
    fn the_default_range_is_clear_of_linuxs_default_ephemeral_range() {
        let linux_default = kernel(32768..=60999, vec![]);
        assert_eq!(linux_default.exposed(&super::super::HOST_PORTS), 0);
        assert_eq!(warning(&super::super::HOST_PORTS, &linux_default), None);
    }

    #[test]
    fn overlap_counts_only_unreserved_ports_and_the_fix_keeps_the_reserved_ones() {
        let wide = kernel(1024..=65535, vec![8080..=8080, 20000..=20009]);
        let host = 20000..=20099;
        assert_eq!(wide.exposed(&host), 90);
        let warned = warning(&host, &wide).unwrap();
        assert!(warned.starts_with("90 of the host ports 20000-20099"), "{warned}");
        assert!(warned.contains("1024-65535"), "{warned}");
        assert_eq!(
            reserve_command(&host, &wide),
            "sysctl -w net.ipv4.ip_local_reserved_ports=8080,20000-20009,20000-20099"
        );
        let reserved = kernel(1024..=65535, vec![20000..=20099]);
        assert_eq!(warning(&host, &reserved), None);
    }

    #[test]
    fn malformed_lists_are_refused() {
        assert_eq!(parse_reserved("1-2,x"), None);
        assert_eq!(parse_reserved("9-2"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("70000 70001"), None);
        assert_eq!(parse_port_range("100 200"), Some(100..=200));
    }
}
