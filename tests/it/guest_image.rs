//! The production guest image (image-builder/build-guest.sh), inspected without booting it and
//! without mounting: its manifest, and its root filesystem read with debugfs from a raw copy.
//! The boot test lives with the agent's tests (they use `production_guest_image()` too).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::vm::{production_guest_image, production_guest_image_nvidia};

/// `key: value` lines of the manifest's header, and its package list.
struct Manifest {
    header: Vec<(String, String)>,
    packages: Vec<(String, String)>,
}

impl Manifest {
    fn read(image: &Path) -> Manifest {
        let path = PathBuf::from(format!("{}.manifest", image.display()));
        let text = std::fs::read_to_string(&path).expect("the manifest beside the image");
        let (head, packages) = text.split_once("\npackages:\n").expect("a packages: section");
        let header = head
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let packages = packages
            .lines()
            .map(|l| l.split_once('\t').expect("package<TAB>version"))
            .map(|(p, v)| (p.to_owned(), v.to_owned()))
            .collect();
        Manifest { header, packages }
    }

    fn get(&self, key: &str) -> &str {
        let found = self.header.iter().find(|(k, _)| k == key);
        &found.unwrap_or_else(|| panic!("the manifest has no {key}: {:?}", self.header)).1
    }

    fn has_package(&self, name: &str) -> bool {
        self.packages.iter().any(|(p, v)| p == name && !v.is_empty())
    }
}

/// A raw copy of the image's disk and where its root partition (the second) starts, so
/// debugfs reads the filesystem in place (`FILE?offset=BYTES`).
struct RootFs {
    _dir: tempfile::TempDir,
    spec: String,
}

impl RootFs {
    fn of(image: &Path) -> RootFs {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(&raw)
            .output()
            .expect("qemu-img (tests/packages.txt) runs");
        assert!(out.status.success(), "qemu-img convert: {out:?}");
        let dump = Command::new("sfdisk").arg("--json").arg(&raw).output().expect("sfdisk runs");
        assert!(dump.status.success(), "sfdisk --json: {dump:?}");
        let table: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
        let parts = table["partitiontable"]["partitions"].as_array().expect("partitions");
        assert_eq!(parts.len(), 2, "ESP and root: {table}");
        assert_eq!(parts[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "the ESP first");
        assert_eq!(parts[1]["name"], "guest-root", "{table}");
        let start = parts[1]["start"].as_u64().unwrap() * 512;
        RootFs { spec: format!("{}?offset={start}", raw.display()), _dir: dir }
    }

    /// One debugfs request (read-only); its output.
    fn debugfs(&self, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request, &self.spec])
            .output()
            .expect("debugfs (e2fsprogs) runs");
        assert!(out.status.success(), "debugfs -R {request}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cat(&self, path: &str) -> String {
        self.debugfs(&format!("cat {path}"))
    }

    /// The names in a directory (debugfs `ls -p`: /inode/mode/uid/gid/name/size/).
    fn ls(&self, dir: &str) -> Vec<String> {
        self.debugfs(&format!("ls -p {dir}"))
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_owned))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect()
    }

    fn exists(&self, path: &str) -> bool {
        let out = Command::new("debugfs")
            .args(["-R", &format!("stat {path}"), &self.spec])
            .output()
            .expect("debugfs runs");
        // debugfs exits 0 either way; a missing file is reported on stderr.
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Inode:")
    }
}

#[test]
fn production_guest_holds_what_a_vm_needs() {
    let image = production_guest_image();
    let manifest = Manifest::read(&image);
    assert!(manifest.get("kernel").contains("amd64"), "kernel: {}", manifest.get("kernel"));
    assert_eq!(manifest.get("nvidia-driver"), "none");
    assert_eq!(manifest.get("nvidia-module"), "none");
    assert!(manifest.get("flags").contains("--no-nvidia"));
    for pkg in
        ["cloud-init", "openssh-server", "qemu-guest-agent", "jupyterlab", "linux-image-amd64"]
    {
        assert!(manifest.has_package(pkg), "{pkg} is not in the manifest");
    }
    assert!(!manifest.has_package("nvidia-driver"));
    let sums = std::fs::read_to_string(format!("{}.sha256", image.display())).unwrap();
    assert!(sums.ends_with("  guest.qcow2\n"), "sha256sum format, name relative: {sums}");

    let root = RootFs::of(&image);
    // Host keys are made at first boot, per VM.
    let ssh = root.ls("/etc/ssh");
    assert!(ssh.iter().any(|n| n == "sshd_config"), "{ssh:?}");
    assert!(!ssh.iter().any(|n| n.starts_with("ssh_host_")), "host keys baked in: {ssh:?}");
    let dropin = root.cat("/etc/cloud/cloud.cfg.d/90-qudata.cfg");
    assert!(dropin.contains("name: renter"), "{dropin}");
    assert!(dropin.contains("datasource_list: [NoCloud, None]"), "{dropin}");
    // Debian's stock cloud.cfg: the agent's seed lifts disable_root.
    let stock = root.cat("/etc/cloud/cloud.cfg");
    assert!(stock.lines().any(|l| l.trim() == "disable_root: true"), "{stock}");
    let shadow = root.cat("/etc/shadow");
    assert!(shadow.lines().any(|l| l.starts_with("root:")), "{shadow}");
    for line in shadow.lines() {
        let field = line.split(':').nth(1).unwrap_or_default();
        assert!(field.starts_with('*') || field.starts_with('!'), "a password: {line}");
    }
    let lists: Vec<String> = root
        .ls("/var/lib/apt/lists")
        .into_iter()
        .filter(|n| n != "partial" && n != "lock")
        .collect();
    assert!(lists.is_empty(), "apt lists left in the image: {lists:?}");
    assert!(root.exists("/usr/bin/jupyter-lab"));
    assert!(root.exists("/vmlinuz") && root.exists("/initrd.img"));
    assert_eq!(root.cat("/etc/machine-id"), "", "machine-id is made at first boot");
    assert!(root.ls("/tmp").is_empty());
}

/// The image with the driver: long (DKMS compiles the module: 7.5 minutes on 2 idle cores, 20
/// beside other work), so only on request:
/// `cargo test --test it -- --ignored production_guest_with_nvidia`.
#[test]
#[ignore = "builds the NVIDIA driver with DKMS (7.5 minutes on 2 idle cores, 20 when busy)"]
fn production_guest_with_nvidia_has_the_module() {
    let image = production_guest_image_nvidia();
    let manifest = Manifest::read(&image);
    let kernel = manifest.get("kernel").to_owned();
    assert!(kernel.contains("amd64"), "kernel: {kernel}");
    let driver = manifest.get("nvidia-driver");
    assert_ne!(driver, "none");
    assert!(
        manifest.has_package("nvidia-driver") && manifest.has_package("nvidia-open-kernel-dkms")
    );
    let module = manifest.get("nvidia-module-file").to_owned();
    assert!(module.starts_with(&format!("/lib/modules/{kernel}/")), "{module}");
    assert!(driver.starts_with(manifest.get("nvidia-module")), "{driver} vs the module's version");
    let root = RootFs::of(&image);
    assert!(root.exists(&module), "{module} is not in the image");
}
