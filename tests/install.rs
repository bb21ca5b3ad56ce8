//! The real `install.sh` in production mode against a temporary root (`--root`): frpc and the
//! base image come from file:// URLs with their SHA-256; packages, modprobe, update-grub and
//! systemctl are skipped there by the script itself. Also: the GRUB drop-in sourced the way
//! grub-mkconfig sources it, the other modes, and shellcheck.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const AGENT: &str = env!("CARGO_BIN_EXE_qudata-agent");
const KEY: &str = "ak-install-test-7f3c9e1d";
const FRPC_SCRIPT: &[u8] = b"#!/bin/sh\necho frpc stand-in for the installer\n";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A temporary root to install into, and the downloads it is served from.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    src: PathBuf,
    frpc_sum: String,
    image: Vec<u8>,
}

impl Fixture {
    /// `grub`: whether the root has an /etc/default/grub (a GRUB host).
    fn new(grub: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let src = dir.path().join("src");
        std::fs::create_dir_all(root.join("etc/default")).unwrap();
        if grub {
            std::fs::write(root.join("etc/default/grub"), "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n")
                .unwrap();
        }
        // The layout of frp's release archive: frp_<version>_linux_amd64/frpc.
        let frp = src.join("frp_0.61.0_linux_amd64");
        std::fs::create_dir_all(&frp).unwrap();
        std::fs::write(frp.join("frpc"), FRPC_SCRIPT).unwrap();
        std::fs::set_permissions(frp.join("frpc"), PermissionsExt::from_mode(0o755)).unwrap();
        let tar = Command::new("tar")
            .args(["-czf", "frp.tar.gz", "frp_0.61.0_linux_amd64"])
            .current_dir(&src)
            .status()
            .unwrap();
        assert!(tar.success());
        let frpc_sum = sha256_hex(&std::fs::read(src.join("frp.tar.gz")).unwrap());
        let image: Vec<u8> =
            (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        std::fs::write(src.join("base.qcow2"), &image).unwrap();
        Fixture { _dir: dir, root, src, frpc_sum, image }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("INSTALL_AGENT_BINARY", AGENT.into()),
            ("INSTALL_FRPC_URL", format!("file://{}", self.src.join("frp.tar.gz").display())),
            ("INSTALL_FRPC_SHA256", self.frpc_sum.clone()),
            ("INSTALL_IMAGE_URL", format!("file://{}", self.src.join("base.qcow2").display())),
            ("INSTALL_IMAGE_SHA256", sha256_hex(&self.image)),
            ("QUDATA_API_KEY", KEY.into()),
        ]
    }

    /// `bash install.sh --root <root> <args>` with a clean environment plus `env` (a value
    /// of `None` drops the variable).
    fn install(&self, args: &[&str], env: &[(&str, Option<String>)]) -> Run {
        let mut vars: BTreeMap<&str, String> = self.env().into_iter().collect();
        for (k, v) in env {
            match v {
                Some(v) => vars.insert(k, v.clone()),
                None => vars.remove(k),
            };
        }
        let out = Command::new("bash")
            .arg(Path::new(REPO).join("install.sh"))
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .envs(vars)
            .output()
            .unwrap();
        Run::from(out)
    }

    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn mode(&self, path: &str) -> u32 {
        std::fs::metadata(self.at(path)).unwrap().permissions().mode() & 0o7777
    }

    /// Every path under the root with what would show a change: inode, size, mtime, mode.
    fn tree(&self) -> BTreeMap<String, (u64, u64, i64, i64, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let m = std::fs::symlink_metadata(&path).unwrap();
                if m.is_dir() {
                    stack.push(path.clone());
                }
                let rel = path.strip_prefix(&self.root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.mode()));
            }
        }
        out
    }
}

struct Run {
    ok: bool,
    code: Option<i32>,
    text: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(KEY), "the API key was echoed:\n{text}");
        Run { ok: out.status.success(), code: out.status.code(), text }
    }
}

#[test]
fn installs_everything_private_and_a_second_run_changes_nothing() {
    let fx = Fixture::new(true);
    let run = fx.install(&[], &[]);
    assert!(run.ok, "{}", run.text);

    let read = |p: &str| std::fs::read(fx.at(p)).unwrap();
    assert_eq!(read("/usr/local/bin/qudata-agent"), std::fs::read(AGENT).unwrap());
    assert_eq!(fx.mode("/usr/local/bin/qudata-agent"), 0o755);
    assert_eq!(read("/usr/local/bin/frpc"), FRPC_SCRIPT, "frpc taken out of the archive");
    assert_eq!(fx.mode("/usr/local/bin/frpc"), 0o755);
    let unit = std::fs::read(Path::new(REPO).join("systemd/qudata-agent.service")).unwrap();
    assert_eq!(read("/etc/systemd/system/qudata-agent.service"), unit);
    assert_eq!(fx.mode("/etc/systemd/system/qudata-agent.service"), 0o644);
    assert_eq!(fx.mode("/etc/qudata"), 0o700);
    assert_eq!(fx.mode("/etc/qudata/agent.env"), 0o600);
    let env = String::from_utf8(read("/etc/qudata/agent.env")).unwrap();
    assert!(env.lines().any(|l| l == format!("QUDATA_API_KEY={KEY}")), "{env}");
    let modules = String::from_utf8(read("/etc/modules-load.d/qudata-vfio.conf")).unwrap();
    let listed: Vec<&str> = modules.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(listed, ["vfio", "vfio_pci", "vfio_iommu_type1"]);
    let dropin = std::fs::read(Path::new(REPO).join("grub/qudata-iommu.cfg")).unwrap();
    assert_eq!(read("/etc/default/grub.d/qudata-iommu.cfg"), dropin);
    assert_eq!(fx.mode("/var/lib/qudata"), 0o700);
    assert_eq!(read("/var/lib/qudata/images/base.qcow2"), fx.image);
    for skipped in ["skip: packages", "skip: modprobe", "skip: update-grub", "skip: systemctl"] {
        assert!(run.text.contains(skipped), "{skipped} missing:\n{}", run.text);
    }
    assert!(run.text.contains("reboot"), "a changed command line needs a reboot:\n{}", run.text);
    // The installed binary is the agent and runs.
    let version = Command::new(fx.at("/usr/local/bin/qudata-agent")).arg("version").output();
    assert!(version.unwrap().status.success());

    // Again, with the downloads gone: anything but "up to date" would have to fetch and fail.
    let before = fx.tree();
    std::fs::remove_file(fx.src.join("frp.tar.gz")).unwrap();
    std::fs::remove_file(fx.src.join("base.qcow2")).unwrap();
    let again = fx.install(&[], &[]);
    assert!(again.ok, "{}", again.text);
    assert_eq!(fx.tree(), before, "a second run changed files:\n{}", again.text);
    assert_eq!(again.text.matches("up to date:").count(), 8, "{}", again.text);
    assert!(!again.text.contains("installed") && !again.text.contains("reboot"), "{}", again.text);
}

#[test]
fn a_checksum_mismatch_is_refused_and_leaves_nothing_behind() {
    let wrong = "0".repeat(64);
    for (variable, what) in
        [("INSTALL_FRPC_SHA256", "frp.tar.gz"), ("INSTALL_IMAGE_SHA256", "base.qcow2")]
    {
        let fx = Fixture::new(true);
        let before = fx.tree();
        let run = fx.install(&[], &[(variable, Some(wrong.clone()))]);
        assert_eq!(run.code, Some(1), "{}", run.text);
        assert!(
            run.text
                .contains(&format!("sha256 mismatch for file://{}", fx.src.join(what).display())),
            "{}",
            run.text
        );
        // Not even the frp archive verified before the image failed, nor an empty directory.
        assert_eq!(fx.tree(), before, "{variable}: left behind:\n{}", run.text);
    }
}

#[test]
fn an_existing_base_image_with_other_contents_is_never_replaced() {
    let fx = Fixture::new(false);
    std::fs::create_dir_all(fx.at("/var/lib/qudata/images")).unwrap();
    std::fs::write(fx.at("/var/lib/qudata/images/base.qcow2"), b"the image VMs are built on")
        .unwrap();
    let before = fx.tree();
    let run = fx.install(&[], &[]);
    assert!(!run.ok && run.text.contains("is not replaced"), "{}", run.text);
    assert_eq!(fx.tree(), before, "{}", run.text);
}

#[test]
fn dry_run_says_what_it_would_do_and_writes_nothing() {
    let fx = Fixture::new(false);
    let before = fx.tree();
    let run = fx.install(&["--dry-run"], &[]);
    assert!(run.ok, "{}", run.text);
    assert_eq!(fx.tree(), before);
    for line in [
        format!("would download file://{}", fx.src.join("frp.tar.gz").display()),
        format!("would install {} (mode 0755)", fx.at("/usr/local/bin/qudata-agent").display()),
        format!("would install {} (mode 0600)", fx.at("/etc/qudata/agent.env").display()),
        "no /etc/default/grub: add intel_iommu=on iommu=pt".to_owned(),
        "dry run: nothing was changed".to_owned(),
    ] {
        assert!(run.text.contains(&line), "{line:?} missing:\n{}", run.text);
    }
}

#[test]
fn the_api_key_is_required_checked_and_rotated_without_losing_settings() {
    let fx = Fixture::new(false);
    let before = fx.tree();
    let missing = fx.install(&[], &[("QUDATA_API_KEY", None)]);
    assert!(!missing.ok && missing.text.contains("QUDATA_API_KEY is not set"), "{}", missing.text);
    let quoted = fx.install(&[], &[("QUDATA_API_KEY", Some(format!("{KEY}'; touch /tmp/x #")))]);
    assert!(!quoted.ok && quoted.text.contains("is not a Qudata API key"), "{}", quoted.text);
    assert_eq!(fx.tree(), before, "refused before anything was written");

    // An operator's setting survives a key rotation; the old key does not.
    std::fs::create_dir_all(fx.at("/etc/qudata")).unwrap();
    std::fs::write(fx.at("/etc/qudata/agent.env"), "QUDATA_DEBUG=true\nQUDATA_API_KEY=ak-old\n")
        .unwrap();
    let run = fx.install(&[], &[]);
    assert!(run.ok, "{}", run.text);
    let env = std::fs::read_to_string(fx.at("/etc/qudata/agent.env")).unwrap();
    assert_eq!(env, format!("QUDATA_DEBUG=true\nQUDATA_API_KEY={KEY}\n"));
    assert_eq!(fx.mode("/etc/qudata/agent.env"), 0o600);
    assert_eq!(fx.mode("/etc/qudata"), 0o700, "a pre-existing dir is made private");
    // Without a key in the environment, the stored one is kept.
    let kept = fx.install(&[], &[("QUDATA_API_KEY", None)]);
    assert!(kept.ok, "{}", kept.text);
    assert_eq!(std::fs::read_to_string(fx.at("/etc/qudata/agent.env")).unwrap(), env);
}

/// GRUB_CMDLINE_LINUX_DEFAULT after /bin/sh sources `/etc/default/grub` content `preset`,
/// then the drop-in (twice when `twice`), as grub-mkconfig does.
fn cmdline_after_dropin(preset: &str, twice: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let grub = dir.path().join("grub");
    std::fs::write(&grub, preset).unwrap();
    let dropin = Path::new(REPO).join("grub/qudata-iommu.cfg");
    let script = if twice { ". \"$1\"; . \"$2\"; . \"$2\"" } else { ". \"$1\"; . \"$2\"" };
    let out = Command::new("/bin/sh")
        .args(["-euc", &format!("{script}; printf %s \"$GRUB_CMDLINE_LINUX_DEFAULT\""), "sh"])
        .arg(&grub)
        .arg(&dropin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_grub_dropin_appends_without_clobbering() {
    let cases = [
        ("GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n", "quiet intel_iommu=on iommu=pt"),
        ("GRUB_CMDLINE_LINUX_DEFAULT=\"\"\n", "intel_iommu=on iommu=pt"),
        ("", "intel_iommu=on iommu=pt"),
        // An operator's own choice wins, whichever variable holds it.
        (
            "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=off\"\n",
            "quiet intel_iommu=off iommu=pt",
        ),
        (
            "GRUB_CMDLINE_LINUX=\"iommu=soft\"\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n",
            "quiet intel_iommu=on",
        ),
        // amd_iommu= is another parameter than iommu=.
        (
            "GRUB_CMDLINE_LINUX_DEFAULT=\"amd_iommu=force_isolation\"\n",
            "amd_iommu=force_isolation intel_iommu=on iommu=pt",
        ),
        (
            "GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\"\n",
            "quiet intel_iommu=on iommu=pt",
        ),
    ];
    for (preset, want) in cases {
        assert_eq!(cmdline_after_dropin(preset, false), want, "{preset:?}");
        assert_eq!(cmdline_after_dropin(preset, true), want, "sourced twice: {preset:?}");
    }
}

#[test]
fn help_and_packages_modes_keep_working() {
    let script = Path::new(REPO).join("install.sh");
    let help = Command::new("bash").arg(&script).arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(help.status.success());
    for mode in ["--local", "--packages FILE", "--dry-run", "--root DIR"] {
        assert!(text.contains(mode), "{mode} missing from --help:\n{text}");
    }
    // Packages already installed: nothing to do, no apt-get.
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("packages.txt");
    std::fs::write(&list, "# comment\nbash coreutils\n").unwrap();
    let out = Command::new("bash").arg(&script).arg("--packages").arg(&list).output().unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let bare = Command::new("bash").arg(&script).arg("--packages").output().unwrap();
    assert_eq!(bare.status.code(), Some(2));
    let unknown = Command::new("bash").arg(&script).arg("--bogus").output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn shellcheck_finds_nothing() {
    let run = |args: &[&str]| {
        let out = Command::new("shellcheck")
            .args(args)
            .current_dir(REPO)
            .output()
            .expect("shellcheck (tests/packages.txt) runs");
        assert!(
            out.status.success(),
            "shellcheck {args:?}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    run(&["install.sh"]);
    // grub-mkconfig sources drop-ins with /bin/sh.
    run(&["--shell=sh", "grub/qudata-iommu.cfg"]);
}
