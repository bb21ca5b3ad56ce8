//! A minimal ustar writer: files go into a container through the engine's archive API as data,
//! owned by root with exact modes, without any program of the image.

/// One archive member. Paths are relative (`root/.ssh/authorized_keys`), at most 100 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Dir { path: &'a str, mode: u32 },
    File { path: &'a str, mode: u32, data: &'a [u8] },
}

/// The archive of `entries`, owned by uid/gid 0, mtime 0.
pub fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        let (path, mode, data, kind) = match entry {
            Entry::Dir { path, mode } => {
                (format!("{}/", path.trim_end_matches('/')), *mode, &[][..], b'5')
            }
            Entry::File { path, mode, data } => ((*path).to_owned(), *mode, *data, b'0'),
        };
        assert!(path.len() <= 100 && !path.starts_with('/'), "tar path {path:?}");
        out.extend_from_slice(&header(&path, mode, data.len() as u64, kind));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0); // two zero blocks end the archive
    out
}

fn header(path: &str, mode: u32, size: u64, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let octal = |h: &mut [u8; 512], at: usize, width: usize, value: u64| {
        let text = format!("{value:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(text.as_bytes());
    };
    h[..path.len()].copy_from_slice(path.as_bytes());
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0); // uid
    octal(&mut h, 116, 8, 0); // gid
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 0); // mtime
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use super::*;

    /// GNU tar (the real tool) reads what we write, with the modes and sizes we gave.
    #[test]
    fn gnu_tar_lists_the_archive() {
        let data = b"ssh-ed25519 AAAA key\n";
        let bytes = archive(&[
            Entry::Dir { path: "root/.ssh", mode: 0o700 },
            Entry::File { path: "root/.ssh/authorized_keys", mode: 0o600, data },
        ]);
        assert_eq!(bytes.len() % 512, 0);
        let mut child = Command::new("tar")
            .args(["-tv", "--numeric-owner", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<Vec<&str>> =
            listing.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0][0], "drwx------");
        assert_eq!(lines[0][1], "0/0");
        assert_eq!(lines[0].last(), Some(&"root/.ssh/"));
        assert_eq!(lines[1][0], "-rw-------");
        assert_eq!(lines[1][2], data.len().to_string());
        assert_eq!(lines[1].last(), Some(&"root/.ssh/authorized_keys"));
    }
}
