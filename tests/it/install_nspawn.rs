//! The one-line install end to end in a Debian 12 system container booted with systemd:
//! install.sh piped from a local HTTP server with the key as its argument, the agent from a
//! release artefact made by scripts/dist.sh, the real systemd starting the unit, the agent
//! registering with the mock control plane and answering `/ping`; then `--uninstall`, after
//! which the container's `/etc` is as it was.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::agent::{Dirs, free_port};
use crate::support::install::{HttpServer, RELEASE, make_release, sha256_hex};
use crate::support::mock_cp::{Behaviour, MockCp, api_key};
use crate::support::nspawn::Container;
use crate::support::wait::wait_until;

/// Every path under the container's /etc with its kind and content hash (or link target).
/// Left out: shadow-utils' own backup copies (`passwd-`, …) and lock file, which
/// useradd/userdel rewrite whatever they change.
fn etc(container: &Container) -> BTreeMap<String, String> {
    let script = r#"cd /etc && find . -xdev \( -type f -o -type l -o -type d \) -printf '%y %m %p %l\n' |
        while read -r kind mode path target; do
          case $path in ./passwd-|./group-|./shadow-|./gshadow-|./subuid-|./subgid-|./.pwd.lock) continue ;; esac
          if [ "$kind" = f ]; then sum=$(sha256sum "$path" | cut -d' ' -f1); else sum=$target; fi
          printf '%s\t%s %s %s\n' "$path" "$kind" "$mode" "$sum"
        done"#;
    let out = container.sh(script);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.to_owned(), v.to_owned()))
        .collect()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_one_line_install_runs_the_agent_under_systemd_and_uninstall_restores_etc() {
    let cp = MockCp::start(Behaviour { without_frp: true, ..Default::default() });
    let dirs = Dirs::new(); // the bridge, subnets and tables the agent uses: the test's own
    let release = dirs.root.path().join("release");
    make_release(&release);
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/install.sh"), release.join("install.sh"))
        .unwrap();
    let server = HttpServer::serve(&release);
    let agent_port = free_port();
    let key = api_key();

    // frp's archive and a base image where the container can read them; the operator's own
    // settings in the env file before the install (kept by it, put back by the uninstall).
    let frp = dirs.root.path().join("frp_0.61.0_linux_amd64");
    std::fs::create_dir_all(&frp).unwrap();
    std::fs::write(frp.join("frpc"), "#!/bin/sh\necho frpc stand-in\n").unwrap();
    let mut settings = String::from("# the operator's settings\n");
    for (k, v) in dirs.net.env().into_iter().chain([
        ("QUDATA_SERVICE_URL", cp.url.clone()),
        ("QUDATA_AGENT_PORT", agent_port.to_string()),
        ("QUDATA_QEMU_ACCEL", "tcg".to_owned()),
        ("QUDATA_PUBLIC_ADDRESS", "203.0.113.7".to_owned()),
    ]) {
        settings.push_str(&format!("{k}={v}\n"));
    }
    let container = Container::boot(|root| {
        let srv = root.join("srv/qudata");
        std::fs::create_dir_all(&srv).unwrap();
        let tar = std::process::Command::new("tar")
            .arg("-czf")
            .arg(srv.join("frp.tar.gz"))
            .arg("-C")
            .arg(dirs.root.path())
            .arg("frp_0.61.0_linux_amd64")
            .status();
        assert!(tar.unwrap().success());
        let image = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(srv.join("base.qcow2"))
            .arg("64M")
            .status();
        assert!(image.unwrap().success());
        std::fs::create_dir_all(root.join("etc/qudata")).unwrap();
        std::fs::write(root.join("etc/qudata/agent.env"), &settings).unwrap();
    });
    let sum = |name: &str| {
        sha256_hex(&std::fs::read(container.root.join("srv/qudata").join(name)).unwrap())
    };
    let before = etc(&container);

    let env = [
        ("INSTALL_RELEASE_URL", server.url("").trim_end_matches('/').to_owned()),
        ("INSTALL_FRPC_URL", "file:///srv/qudata/frp.tar.gz".to_owned()),
        ("INSTALL_FRPC_SHA256", sum("frp.tar.gz")),
        ("INSTALL_IMAGE_URL", "file:///srv/qudata/base.qcow2".to_owned()),
        ("INSTALL_IMAGE_SHA256", sum("base.qcow2")),
        ("KEY", key.clone()),
    ];
    let one_liner = format!("curl -fsSL {} | bash -s -- \"$KEY\"", server.url("install.sh"));
    let install = container.sh_with(&one_liner, &env);
    let said = text(&install);
    assert!(install.status.success(), "{said}");
    assert!(said.contains("release 0.1.0 verified"), "{said}");
    assert!(!said.contains(&key), "the key was echoed:\n{said}");
    let tarball = std::fs::read(release.join(RELEASE)).unwrap();
    assert!(!tarball.is_empty());

    // systemd started it; it registered and answers on 127.0.0.1.
    let url = format!("http://127.0.0.1:{agent_port}/ping");
    let client = reqwest::Client::new();
    wait_until(
        "the installed agent to answer /ping",
        Duration::from_secs(120),
        Duration::from_millis(250),
        async || match client.get(&url).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        },
    )
    .await;
    let active = container.sh("systemctl is-active qudata-agent");
    assert_eq!(String::from_utf8_lossy(&active.stdout).trim(), "active", "{}", text(&active));
    assert!(cp.requests().iter().any(|r| r.path == "/init"), "it registered");

    let uninstall = container
        .sh_with(&format!("curl -fsSL {} | bash -s -- --uninstall", server.url("install.sh")), &[]);
    assert!(uninstall.status.success(), "{}", text(&uninstall));
    let inactive = container.sh("systemctl is-active qudata-agent");
    assert_ne!(String::from_utf8_lossy(&inactive.stdout).trim(), "active");
    let after = etc(&container);
    let changed: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .cloned()
        .collect();
    assert!(
        changed.is_empty(),
        "/etc differs after --uninstall: {changed:?}\n{}",
        text(&uninstall)
    );
}
