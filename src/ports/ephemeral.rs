//! The kernel's own use of port numbers: every outgoing connection takes a local port from
//! `net.ipv4.ip_local_port_range` (skipping `ip_local_reserved_ports`). A host port of ours in
//! that range can be taken by any client on the host while its instance is stopped (or before
//! its forward opens), and the next start then fails with "address in use". The default range
//! lies below Linux's default ephemeral range; this says when a host's settings undo that.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// The kernel's settings cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EphemeralError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is unreadable: {text:?}")]
    Unparsable { path: PathBuf, text: String },
}

/// What `/proc/sys/net/ipv4` says about automatic port assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPorts {
    pub ephemeral: RangeInclusive<u16>,
    pub reserved: Vec<RangeInclusive<u16>>,
}

impl KernelPorts {
    /// Reads `ip_local_port_range` and `ip_local_reserved_ports` under `proc_root`.
    pub fn read(proc_root: &Path) -> Result<KernelPorts, EphemeralError> {
        let dir = proc_root.join("sys/net/ipv4");
        let read = |name: &str| {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok((path, text)),
                Err(source) => Err(EphemeralError::Read { path, source }),
            }
        };
        let unparsable = |path, text: String| EphemeralError::Unparsable { path, text };
        let (path, text) = read("ip_local_port_range")?;
        let ephemeral = parse_port_range(&text).ok_or_else(|| unparsable(path, text))?;
        // Older kernels and some containers have no reserved list: nothing is reserved.
        let reserved = match read("ip_local_reserved_ports") {
            Ok((path, text)) => parse_reserved(&text).ok_or_else(|| unparsable(path, text))?,
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

/// What the kernel's settings mean for a host port range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No port of the range is handed to outgoing connections.
    Clear { ephemeral: RangeInclusive<u16> },
    /// Some are: what is wrong, and the sysctl that fixes it.
    Exposed { problem: String, fix: String },
}

/// The agent's start and `doctor` both say this: reads the kernel's settings under
/// `proc_root` and judges `host` against them.
pub fn judge(proc_root: &Path, host: &RangeInclusive<u16>) -> Result<Verdict, EphemeralError> {
    let kernel = KernelPorts::read(proc_root)?;
    let exposed = kernel.exposed(host);
    if exposed == 0 {
        return Ok(Verdict::Clear { ephemeral: kernel.ephemeral });
    }
    let problem = format!(
        "{exposed} of the host ports {}-{} (QUDATA_HOST_PORTS) lie in the kernel's ephemeral range \
         {}-{} unreserved: an outgoing connection can take one while its instance is stopped, \
         and the instance then cannot start",
        host.start(),
        host.end(),
        kernel.ephemeral.start(),
        kernel.ephemeral.end()
    );
    Ok(Verdict::Exposed { problem, fix: reserve_command(host, &kernel) })
}

/// The sysctl that keeps the kernel off `host`, keeping what is reserved already.
fn reserve_command(host: &RangeInclusive<u16>, kernel: &KernelPorts) -> String {
    let range = |r: &RangeInclusive<u16>| {
        if r.start() == r.end() {
            r.start().to_string()
        } else {
            format!("{}-{}", r.start(), r.end())
        }
    };
    let items: Vec<String> = kernel.reserved.iter().chain([host]).map(range).collect();
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
        assert!(matches!(err, EphemeralError::Unparsable { .. }), "{err}");
        assert!(
            err.to_string().ends_with("ip_local_port_range is unreadable: \"60999 32768\\n\""),
            "{err}"
        );
        std::fs::remove_file(dir.join("ip_local_port_range")).unwrap();
        let err = KernelPorts::read(root.path()).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }

    #[test]
    fn reads_this_hosts_kernel() {
        let got = KernelPorts::read(Path::new("/proc")).unwrap();
        assert!(got.ephemeral.start() <= got.ephemeral.end());
    }

    /// A /proc with the given kernel settings.
    fn proc_with(range: &str, reserved: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/net/ipv4");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ip_local_port_range"), range).unwrap();
        std::fs::write(dir.join("ip_local_reserved_ports"), reserved).unwrap();
        root
    }

    #[test]
    fn the_default_range_is_clear_of_linuxs_default_ephemeral_range() {
        let linux_default = kernel(32768..=60999, vec![]);
        assert_eq!(linux_default.exposed(&super::super::HOST_PORTS), 0);
        let proc = proc_with("32768\t60999\n", "\n");
        assert_eq!(
            judge(proc.path(), &super::super::HOST_PORTS).unwrap(),
            Verdict::Clear { ephemeral: 32768..=60999 }
        );
    }

    #[test]
    fn overlap_counts_only_unreserved_ports_and_the_fix_keeps_the_reserved_ones() {
        let host = 20000..=20099;
        assert_eq!(kernel(1024..=65535, vec![8080..=8080, 20000..=20009]).exposed(&host), 90);
        let proc = proc_with("1024 65535\n", "8080,20000-20009\n");
        let Ok(Verdict::Exposed { problem, fix }) = judge(proc.path(), &host) else {
            panic!("not exposed")
        };
        assert!(problem.starts_with("90 of the host ports 20000-20099"), "{problem}");
        assert!(problem.contains("1024-65535"), "{problem}");
        assert_eq!(fix, "sysctl -w net.ipv4.ip_local_reserved_ports=8080,20000-20009,20000-20099");
        let reserved = proc_with("1024 65535\n", "20000-20099\n");
        assert!(matches!(judge(reserved.path(), &host), Ok(Verdict::Clear { .. })));
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
