//! The real `install.sh` in production mode against a temporary root (`--root`): frpc and the
//! base image come from file:// URLs with their SHA-256; packages, modprobe, update-grub and
//! systemctl are skipped there by the script itself. Also: the GRUB drop-in sourced the way
//! grub-mkconfig sources it, the other modes, and shellcheck.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::install::{AGENT, FRPC_SCRIPT, Fixture, HttpServer, KEY, REPO, sha256_hex};

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
    assert_eq!(fx.mode("/var/lib/qudata"), 0o711, "QEMU's user passes through, never lists");
    assert_eq!(fx.mode("/var/lib/qudata/images/base.qcow2"), 0o644);
    assert_eq!(read("/var/lib/qudata/images/base.qcow2"), fx.image);
    let skips =
        ["skip: packages", "skip: user", "skip: modprobe", "skip: update-grub", "skip: systemctl"];
    for skipped in skips {
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
fn without_an_image_url_the_dry_run_plans_to_build_the_production_guest() {
    let fx = Fixture::new(false);
    let before = fx.tree();
    let no_url = [("INSTALL_IMAGE_URL", None), ("INSTALL_IMAGE_SHA256", None)];
    let builder = Path::new(REPO).join("image-builder/build-guest.sh");
    let images = fx.at("/var/lib/qudata/images");
    let plan = |tail: &str| {
        format!(
            "would build the base image: {} --out {}/guest.qcow2 {tail}, then link {}/base.qcow2 -> guest.qcow2",
            builder.display(),
            images.display(),
            images.display()
        )
    };
    let run = fx.install(&["--dry-run"], &no_url);
    assert!(run.ok, "{}", run.text);
    let with_driver = plan("(with the NVIDIA driver)");
    assert!(run.text.contains(&with_driver), "{with_driver:?} missing:\n{}", run.text);
    for no_nvidia in [
        fx.install(&["--dry-run", "--image-no-nvidia"], &no_url),
        fx.install(
            &["--dry-run"],
            &[no_url[0].clone(), no_url[1].clone(), ("INSTALL_IMAGE_NO_NVIDIA", Some("1".into()))],
        ),
    ] {
        assert!(no_nvidia.ok, "{}", no_nvidia.text);
        let line = plan("--no-nvidia");
        assert!(no_nvidia.text.contains(&line), "{line:?} missing:\n{}", no_nvidia.text);
    }
    assert_eq!(fx.tree(), before, "a dry run wrote files");
    // An image that is there is kept, never rebuilt over.
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("base.qcow2"), b"an image").unwrap();
    let kept = fx.install(&["--dry-run"], &no_url);
    assert!(kept.ok && kept.text.contains("base image: keeping"), "{}", kept.text);
    assert!(!kept.text.contains("would build the base image"), "{}", kept.text);
    let bad = fx.install(&["--dry-run"], &[("INSTALL_IMAGE_NO_NVIDIA", Some("yes".into()))]);
    assert!(!bad.ok && bad.text.contains("INSTALL_IMAGE_NO_NVIDIA must be 0 or 1"), "{}", bad.text);
}

#[test]
fn the_api_key_is_required_checked_and_rotated_without_losing_settings() {
    let fx = Fixture::new(false);
    let before = fx.tree();
    let missing = fx.install(&[], &[("QUDATA_API_KEY", None)]);
    assert!(!missing.ok && missing.text.contains("no API key"), "{}", missing.text);
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
    let modes = ["--local", "--packages FILE", "--dry-run", "--root DIR", "--hugepages-gib N"];
    for mode in modes.iter().chain(&["--uninstall [--purge]", "ak-YOUR-API-KEY"]) {
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
    run(&["install.sh", "tests/run-all.sh", ".ci/run", "scripts/dist.sh"]);
    // Together, so the library they source is checked as one of the inputs.
    let builder: Vec<String> = std::fs::read_dir(Path::new(REPO).join("image-builder"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "sh"))
        .map(|path| path.display().to_string())
        .collect();
    assert!(!builder.is_empty(), "no image-builder scripts found");
    run(&builder.iter().map(String::as_str).collect::<Vec<_>>());
    // grub-mkconfig sources drop-ins with /bin/sh.
    run(&["--shell=sh", "grub/qudata-iommu.cfg"]);
}

#[test]
fn downloads_over_http_and_a_missing_file_leaves_nothing() {
    let fx = Fixture::new(false);
    let server = HttpServer::serve(&fx.src);
    let before = fx.tree();
    let gone = fx.install(&[], &[("INSTALL_IMAGE_URL", Some(server.url("missing.qcow2")))]);
    assert_eq!(gone.code, Some(1), "{}", gone.text);
    assert!(gone.text.contains("cannot download http://127.0.0.1"), "{}", gone.text);
    assert_eq!(fx.tree(), before, "a failed download left files:\n{}", gone.text);

    let http = [
        ("INSTALL_FRPC_URL", Some(server.url("frp.tar.gz"))),
        ("INSTALL_IMAGE_URL", Some(server.url("base.qcow2"))),
    ];
    let run = fx.install(&[], &http);
    assert!(run.ok, "{}", run.text);
    assert_eq!(std::fs::read(fx.at("/usr/local/bin/frpc")).unwrap(), FRPC_SCRIPT);
    assert_eq!(std::fs::read(fx.at("/var/lib/qudata/images/base.qcow2")).unwrap(), fx.image);
}

#[test]
fn hugepages_for_vms_are_opt_in_shown_by_dry_run_and_undone_by_zero() {
    let fx = Fixture::new(true);
    let dropin = "/etc/default/grub.d/qudata-hugepages.cfg";
    let plain = fx.install(&[], &[]);
    assert!(plain.ok, "{}", plain.text);
    assert!(!fx.at(dropin).exists(), "no huge pages unless asked");

    let before = fx.tree();
    let dry = fx.install(&["--dry-run", "--hugepages-gib", "64"], &[]);
    assert!(dry.ok, "{}", dry.text);
    assert_eq!(fx.tree(), before);
    let would = format!("would install {} (mode 0644)", fx.at(dropin).display());
    assert!(dry.text.contains(&would), "{would:?} missing:\n{}", dry.text);

    let run = fx.install(&["--hugepages-gib", "64"], &[]);
    assert!(run.ok, "{}", run.text);
    assert_eq!(fx.mode(dropin), 0o644);
    let text = std::fs::read_to_string(fx.at(dropin)).unwrap();
    assert!(text.contains("# pool before: 0"), "the record of what to give back:\n{text}");
    // grub-mkconfig sources it with /bin/sh: appended once, however often it is sourced.
    let sourced = |preset: &str| {
        let out = Command::new("/bin/sh")
            .args(["-euc", ". \"$1\"; . \"$1\"; printf %s \"$GRUB_CMDLINE_LINUX_DEFAULT\"", "sh"])
            .arg(fx.at(dropin))
            .env("GRUB_CMDLINE_LINUX_DEFAULT", preset)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(sourced("quiet"), "quiet hugepagesz=1G hugepages=64");
    assert_eq!(sourced(""), "hugepagesz=1G hugepages=64");
    let out = Command::new("shellcheck").args(["--shell=sh"]).arg(fx.at(dropin)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Again: nothing changes. An environment variable asks the same.
    let same = fx.tree();
    let again = fx.install(&[], &[("INSTALL_HUGEPAGES_GIB", Some("64".into()))]);
    assert!(again.ok && again.text.contains("up to date"), "{}", again.text);
    assert_eq!(fx.tree(), same);

    let bad = fx.install(&["--hugepages-gib", "lots"], &[]);
    assert!(!bad.ok && bad.text.contains("give a whole number of GiB"), "{}", bad.text);

    let undo = fx.install(&["--hugepages-gib", "0"], &[]);
    assert!(undo.ok, "{}", undo.text);
    assert!(!fx.at(dropin).exists(), "{}", undo.text);
    let none = fx.install(&["--hugepages-gib=0"], &[]);
    assert!(none.text.contains("up to date: no huge pages reserved for VMs"), "{}", none.text);
}

/// The one-line install: no checkout, the key as an argument, the agent, its unit and the
/// GRUB drop-in from a release artefact made by scripts/dist.sh and served over HTTP.
#[test]
fn the_one_line_install_takes_the_release_artefact_and_the_key_as_its_argument() {
    use crate::support::install::{RELEASE, make_release};
    let fx = Fixture::new(true);
    let release_dir = fx.src.join("release");
    let tarball = make_release(&release_dir);
    let server = HttpServer::serve(&release_dir);
    let base = server.url("").trim_end_matches('/').to_owned();
    let url = [("INSTALL_RELEASE_URL", base.clone())];

    // The key's shape is checked before anything, and the refusal does not echo it.
    let before = fx.tree();
    let bad = fx.install_piped(&["ak-bad key;$(id)"], &url);
    assert_eq!(bad.code, Some(1), "{}", bad.text);
    assert!(bad.text.contains("is not a Qudata API key") && !bad.text.contains("bad key"));
    let none = fx.install_piped(&[], &url);
    assert!(!none.ok && none.text.contains("no API key"), "{}", none.text);
    assert_eq!(fx.tree(), before);

    let run = fx.install_piped(&[KEY], &url);
    assert!(run.ok, "{}", run.text);
    assert!(run.text.contains("release 0.1.0 verified"), "{}", run.text);
    // The installed agent is the release's (stripped of debug info), not a build.
    let unpacked = tempfile::tempdir().unwrap();
    let tar = Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(unpacked.path()).status();
    assert!(tar.unwrap().success());
    let shipped = unpacked.path().join("qudata-agent");
    for (from, to) in [
        ("qudata-agent", "/usr/local/bin/qudata-agent"),
        ("systemd/qudata-agent.service", "/etc/systemd/system/qudata-agent.service"),
        ("grub/qudata-iommu.cfg", "/etc/default/grub.d/qudata-iommu.cfg"),
    ] {
        let want = std::fs::read(shipped.join(from)).unwrap();
        assert!(std::fs::read(fx.at(to)).unwrap() == want, "{to} is not the release's {from}");
    }
    let version = Command::new(fx.at("/usr/local/bin/qudata-agent")).arg("version").output();
    assert!(String::from_utf8_lossy(&version.unwrap().stdout).starts_with("qudata-agent 0.1.0"));
    let env = std::fs::read_to_string(fx.at("/etc/qudata/agent.env")).unwrap();
    assert!(env.ends_with(&format!("QUDATA_API_KEY={KEY}\n")), "the key from the argument");
    assert_eq!(fx.mode("/etc/qudata/agent.env"), 0o600);

    // A second run changes nothing; the release is checked again.
    let after = fx.tree();
    let again = fx.install_piped(&[KEY], &url);
    assert!(again.ok && !again.text.contains("installed /"), "{}", again.text);
    assert_eq!(fx.tree(), after);

    // A pinned checksum that does not match, or a published one that does not: refused,
    // nothing changed.
    let wrong = "0".repeat(64);
    let pinned = fx.install_piped(&[KEY], &[url[0].clone(), ("INSTALL_RELEASE_SHA256", wrong)]);
    assert_eq!(pinned.code, Some(1), "{}", pinned.text);
    assert!(pinned.text.contains("sha256 mismatch") && pinned.text.contains("refusing it"));
    std::fs::write(
        release_dir.join(format!("{RELEASE}.sha256")),
        format!("{}  {RELEASE}\n", "1".repeat(64)),
    )
    .unwrap();
    let published = fx.install_piped(&[KEY], &url);
    assert!(!published.ok && published.text.contains("sha256 mismatch"), "{}", published.text);
    assert_eq!(fx.tree(), after, "a refused release changed the host");
}

/// A release unpacked by hand installs from its own files, checked against its SHA256SUMS.
#[test]
fn an_unpacked_release_installs_from_its_own_files_and_refuses_a_changed_one() {
    use crate::support::install::make_release;
    let fx = Fixture::new(false);
    let tarball = make_release(&fx.src.join("release"));
    let unpacked = fx.src.join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let tar = Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&unpacked).status();
    assert!(tar.unwrap().success());
    let script = unpacked.join("qudata-agent/install.sh");
    let run = |extra: &[&str]| {
        let mut vars: Vec<(&str, String)> = fx.env();
        vars.retain(|(k, _)| *k != "INSTALL_AGENT_BINARY");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--root")
            .arg(&fx.root)
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .envs(vars)
            .output()
            .unwrap();
        crate::support::install::Run::from(out)
    };
    let before = fx.tree();
    // One byte of the unit changed after the release was made.
    let unit = unpacked.join("qudata-agent/systemd/qudata-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&unit, format!("{text}# changed\n")).unwrap();
    let changed = run(&[]);
    assert!(
        !changed.ok && changed.text.contains("does not match its SHA256SUMS"),
        "{}",
        changed.text
    );
    assert_eq!(fx.tree(), before);
    std::fs::write(&unit, text).unwrap();
    let ok = run(&[]);
    assert!(ok.ok, "{}", ok.text);
    let shipped = std::fs::read(unpacked.join("qudata-agent/qudata-agent")).unwrap();
    assert!(std::fs::read(fx.at("/usr/local/bin/qudata-agent")).unwrap() == shipped);
}

/// Every path under `root`: its kind, permission bits and, for a file, its SHA-256 (what an
/// uninstall must put back; directories' times are not compared).
fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                stack.push(path);
                out.insert(rel, ('d', mode, String::new()));
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap().display().to_string();
                out.insert(rel, ('l', 0, target));
            } else {
                out.insert(rel, ('f', mode, sha256_hex(&std::fs::read(&path).unwrap())));
            }
        }
    }
    out
}

#[test]
fn uninstall_undoes_what_the_manifest_recorded_and_keeps_data_unless_purged() {
    let fx = Fixture::new(true);
    // The operator's own file where the agent's unit goes: replaced, then put back.
    let unit = "/etc/systemd/system/qudata-agent.service";
    std::fs::create_dir_all(fx.at("/etc/systemd/system")).unwrap();
    std::fs::write(fx.at(unit), "# the operator's own\n").unwrap();
    let before = snapshot(&fx.root);

    let install = fx.install(&[], &[]);
    assert!(install.ok, "{}", install.text);
    let manifest = std::fs::read_to_string(fx.at("/var/lib/qudata/install-manifest")).unwrap();
    assert_eq!(fx.mode("/var/lib/qudata/install-manifest"), 0o600);
    for line in [
        "created /usr/local/bin/qudata-agent",
        "created /etc/qudata/agent.env",
        "created /etc/default/grub.d/qudata-iommu.cfg",
        "created /etc/modules-load.d/qudata-vfio.conf",
        &format!("replaced {unit}"),
    ] {
        assert!(manifest.lines().any(|l| l == line), "{line} not in the manifest:\n{manifest}");
    }

    let installed = snapshot(&fx.root);
    let dry = fx.install(&["--uninstall", "--dry-run"], &[("QUDATA_API_KEY", None)]);
    assert!(
        dry.ok && dry.text.contains("would remove /usr/local/bin/qudata-agent"),
        "{}",
        dry.text
    );
    assert!(dry.text.contains(&format!("would put back the original {unit}")), "{}", dry.text);
    assert_eq!(snapshot(&fx.root), installed, "a dry run changed something");

    let gone = fx.install(&["--uninstall"], &[("QUDATA_API_KEY", None)]);
    assert!(gone.ok, "{}", gone.text);
    assert_eq!(std::fs::read_to_string(fx.at(unit)).unwrap(), "# the operator's own\n");
    // Only the data dir is left: the images (and the identity, when the agent made one).
    let mut kept = snapshot(&fx.root);
    let data: Vec<String> = kept.keys().filter(|p| !before.contains_key(*p)).cloned().collect();
    assert_eq!(
        data,
        [
            "var",
            "var/lib",
            "var/lib/qudata",
            "var/lib/qudata/images",
            "var/lib/qudata/images/base.qcow2"
        ],
        "{}",
        gone.text
    );
    kept.retain(|p, _| before.contains_key(p));
    assert_eq!(kept, before, "the uninstall left a change:\n{}", gone.text);
    let again = fx.install(&["--uninstall"], &[("QUDATA_API_KEY", None)]);
    assert!(!again.ok && again.text.contains("no install manifest"), "{}", again.text);

    // Installed again, then purged: the tree is as it was before the first install.
    let install = fx.install(&[], &[]);
    assert!(install.ok, "{}", install.text);
    let purged = fx.install(&["--uninstall", "--purge"], &[("QUDATA_API_KEY", None)]);
    assert!(purged.ok, "{}", purged.text);
    assert_eq!(snapshot(&fx.root), before, "{}", purged.text);
}

/// A GPU host's sysfs for the installer: an H100 and its audio function in IOMMU group 12
/// (`groups`: whether the IOMMU is on), plus `extra` devices.
fn gpu_sysfs(groups: bool) -> crate::support::sysfs::FakeSysfs {
    use crate::support::sysfs::{CLASS_AUDIO, FakeSysfs};
    let fake = FakeSysfs::new().gpu("0000:65:00.0", 0x2330).driver("nvidia");
    let fake = if groups { fake.group(12) } else { fake };
    let fake = fake.function("0000:65:00.1", CLASS_AUDIO).driver("snd_hda_intel");
    if groups { fake.group(12) } else { fake }
}

/// `install.sh --finish --root <root>`, as the one-shot unit runs it after the reboot, with
/// `sysfs` as the rebooted host's.
fn finish(fx: &Fixture, sysfs: &crate::support::sysfs::FakeSysfs) -> crate::support::install::Run {
    let out = Command::new("bash")
        .arg(Path::new(REPO).join("install.sh"))
        .args(["--finish", "--root"])
        .arg(&fx.root)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("INSTALL_SYSFS_ROOT", sysfs.path())
        .output()
        .unwrap();
    crate::support::install::Run::from(out)
}

#[test]
fn a_passthrough_host_gets_vfio_pci_at_boot_and_finishes_after_the_reboot() {
    let fx = Fixture::new(true);
    let sysfs = gpu_sysfs(true);
    let env = [("INSTALL_SYSFS_ROOT", Some(sysfs.path().display().to_string()))];
    let before = snapshot(&fx.root);
    let dry = fx.install(&["--dry-run"], &env);
    assert!(dry.ok, "{}", dry.text);
    assert!(dry.text.contains("GPU 0000:65:00.0 (10de:2330), IOMMU group 12"), "{}", dry.text);
    assert!(dry.text.contains("would install") && dry.text.contains("qudata-vfio-pci.conf"));
    assert_eq!(snapshot(&fx.root), before, "a dry run changed something");

    let run = fx.install(&[], &env);
    assert!(run.ok, "{}", run.text);
    let vfio = std::fs::read_to_string(fx.at("/etc/modprobe.d/qudata-vfio-pci.conf")).unwrap();
    assert!(vfio.lines().any(|l| l == "options vfio-pci ids=10de:2330,10de:22bc"), "{vfio}");
    assert!(vfio.lines().any(|l| l == "softdep nvidia pre: vfio-pci"), "{vfio}");
    let nouveau = std::fs::read_to_string(fx.at("/etc/modprobe.d/qudata-blacklist-nouveau.conf"));
    assert!(nouveau.unwrap().lines().any(|l| l == "blacklist nouveau"));
    let settings = std::fs::read_to_string(fx.at("/etc/qudata/agent.env")).unwrap();
    assert!(settings.lines().any(|l| l == "QUDATA_BACKEND=qemu"), "{settings}");
    // The kernel command line changed: the one-shot unit finishes after the reboot.
    assert!(run.text.contains("reboot to finish"), "{}", run.text);
    let unit = std::fs::read_to_string(fx.at("/etc/systemd/system/qudata-install-finish.service"));
    assert!(unit.unwrap().contains("ExecStart=/usr/local/lib/qudata/install.sh --finish"));
    let kept = std::fs::read(fx.at("/usr/local/lib/qudata/install.sh")).unwrap();
    assert!(kept == std::fs::read(Path::new(REPO).join("install.sh")).unwrap());
    assert!(fx.at("/var/lib/qudata/install-pending").exists());

    // After the reboot: the IOMMU is on, the unit's run finishes; then nothing is pending.
    let done = finish(&fx, &sysfs);
    assert!(done.ok && done.text.contains("finished after the reboot (ok)"), "{}", done.text);
    assert!(done.text.contains("state: GPU 0000:65:00.0 on nvidia"), "{}", done.text);
    assert!(!fx.at("/var/lib/qudata/install-pending").exists());
    let twice = finish(&fx, &sysfs);
    assert!(twice.ok && twice.text.contains("nothing to finish"), "{}", twice.text);

    // A second install changes nothing and says where the host stands.
    let settled = snapshot(&fx.root);
    let again = fx.install(&[], &env);
    assert!(
        again.ok && again.text.contains("state: 1 IOMMU groups; backend qemu"),
        "{}",
        again.text
    );
    assert_eq!(snapshot(&fx.root), settled);

    // The uninstall takes every file of it away again.
    let gone = fx.install(&["--uninstall", "--purge"], &[("QUDATA_API_KEY", None)]);
    assert!(gone.ok, "{}", gone.text);
    assert_eq!(snapshot(&fx.root), before, "{}", gone.text);
}

#[test]
fn a_host_whose_iommu_stays_off_after_the_reboot_falls_back_to_docker() {
    let fx = Fixture::new(true);
    let off = gpu_sysfs(false);
    let env = [("INSTALL_SYSFS_ROOT", Some(off.path().display().to_string()))];
    let run = fx.install(&[], &env);
    assert!(run.ok, "{}", run.text);
    assert!(run.text.contains("the IOMMU is off now"), "{}", run.text);
    let done = finish(&fx, &off);
    assert!(
        done.ok && done.text.contains("the IOMMU is still off after the reboot"),
        "{}",
        done.text
    );
    let settings = std::fs::read_to_string(fx.at("/etc/qudata/agent.env")).unwrap();
    assert!(settings.lines().any(|l| l == "QUDATA_BACKEND=docker"), "{settings}");
    assert!(settings.lines().any(|l| l == format!("QUDATA_API_KEY={KEY}")), "the key is kept");
    assert!(!settings.lines().any(|l| l == "QUDATA_BACKEND=qemu"));
}

#[test]
fn a_gpu_sharing_its_iommu_group_with_a_host_device_gets_the_docker_backend() {
    use crate::support::sysfs::CLASS_ETHERNET;
    let fx = Fixture::new(false);
    let sysfs = gpu_sysfs(true)
        .device("0000:66:00.0", 0x8086, 0x1593, CLASS_ETHERNET)
        .driver("ice")
        .group(12);
    let env = [("INSTALL_SYSFS_ROOT", Some(sysfs.path().display().to_string()))];
    let run = fx.install(&[], &env);
    assert!(run.ok, "{}", run.text);
    assert!(
        run.text.contains("0000:66:00.0 (driver ice) shares its IOMMU group 12"),
        "{}",
        run.text
    );
    assert!(run.text.contains("the Docker backend"), "{}", run.text);
    let settings = std::fs::read_to_string(fx.at("/etc/qudata/agent.env")).unwrap();
    assert!(settings.lines().any(|l| l == "QUDATA_BACKEND=docker"), "{settings}");
    assert!(!fx.at("/etc/modprobe.d/qudata-vfio-pci.conf").exists(), "no GPU goes to vfio-pci");
}

#[test]
fn uninstall_also_removes_the_frpc_files_the_agent_wrote() {
    let fx = Fixture::new(false);
    let install = fx.install(&[], &[]);
    assert!(install.ok, "{}", install.text);
    // What the agent writes beside its settings once it runs.
    std::fs::create_dir_all(fx.at("/etc/qudata/frpc.d")).unwrap();
    std::fs::write(fx.at("/etc/qudata/frpc.toml"), "serverAddr = \"x\"\n").unwrap();
    std::fs::write(fx.at("/etc/qudata/frpc.d/abc.toml"), "[[proxies]]\n").unwrap();
    let gone = fx.install(&["--uninstall"], &[("QUDATA_API_KEY", None)]);
    assert!(gone.ok, "{}", gone.text);
    assert!(!fx.at("/etc/qudata").exists(), "{}", gone.text);
}

#[test]
fn uninstall_gives_gpus_the_boot_configuration_kept_on_vfio_pci_back_to_their_drivers() {
    use crate::support::kernel::SimKernel;
    use crate::support::sysfs::{CLASS_AUDIO, FakeSysfs};
    let fx = Fixture::new(false);
    let env = [("INSTALL_SYSFS_ROOT", Some(gpu_sysfs(true).path().display().to_string()))];
    assert!(fx.install(&[], &env).ok);
    // After the reboot: vfio-pci took the GPU and its audio function at boot.
    let booted = FakeSysfs::new()
        .driver_available("nvidia")
        .driver_available("snd_hda_intel")
        .gpu("0000:65:00.0", 0x2330)
        .driver("vfio-pci")
        .group(12)
        .function("0000:65:00.1", CLASS_AUDIO)
        .driver("vfio-pci")
        .group(12);
    let native = [("0000:65:00.0", "nvidia"), ("0000:65:00.1", "snd_hda_intel")];
    let kernel = SimKernel::start(&booted, &native);
    let env = [
        ("INSTALL_SYSFS_ROOT", Some(booted.path().display().to_string())),
        ("QUDATA_API_KEY", None),
    ];
    let gone = fx.install(&["--uninstall"], &env);
    assert!(gone.ok, "{}", gone.text);
    assert_eq!(booted.driver_of("0000:65:00.0").as_deref(), Some("nvidia"), "{:?}", kernel.log());
    assert_eq!(booted.driver_of("0000:65:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(booted.override_of("0000:65:00.0"), "(null)");
    assert!(gone.text.contains("gave 0000:65:00.0 back to a host driver: nvidia"), "{}", gone.text);
    assert!(!fx.at("/etc/modprobe.d/qudata-vfio-pci.conf").exists());
}
