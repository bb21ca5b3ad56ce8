//! Recovery against real QEMUs (cheap ones: `-S`, no disk): the backend's view of what it owns,
//! and orphans reaped without touching anything the agent did not make.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qudata_agent::backend::qemu::accel::Accel;
use qudata_agent::backend::qemu::{QemuBackend, QemuSettings, disk};
use qudata_agent::backend::{Backend, Owned};
use qudata_agent::guest::ManagementKey;
use support::orphans::{foreign, orphan};

fn backend(data: &Path, run: &Path) -> Arc<QemuBackend> {
    let settings = QemuSettings {
        qemu_binary: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        ovmf: disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).unwrap(),
        accel: Accel::Tcg,
        base_image: data.join("images/base.qcow2"),
        images_dir: data.join("images"),
        data_dir: data.to_owned(),
        run_dir: run.to_owned(),
        boot_deadline: Duration::from_secs(60),
        powerdown_grace: Duration::from_secs(5),
        proc_root: Default::default(),
    };
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    Arc::new(QemuBackend::new(settings, ManagementKey::generate(), events))
}

#[tokio::test]
async fn backend_finds_and_reaps_only_its_own_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let mut ours = orphan(&data, &run, "orphan-1");
    // Another agent's VM (same marker, other run dir) and a QEMU without the marker.
    let mut other_agent = orphan(&dir.path().join("d2"), &dir.path().join("r2"), "orphan-1");
    let mut stranger = foreign(&dir.path().join("elsewhere"), "web-server");
    let paths = ours.paths.clone().unwrap();
    let stray = paths.dir.join("renter-notes.txt");
    std::fs::write(&stray, "not the agent's").unwrap();

    let qemu = backend(&data, &run);
    let found = qemu.find_owned().await.unwrap();
    let want = Owned { instance_id: "orphan-1".into(), what: format!("QEMU pid {}", ours.pid()) };
    assert_eq!(found, vec![want.clone()]);

    qemu.reap(&want).await.unwrap();
    assert!(!ours.alive(), "the orphan is stopped");
    assert!(other_agent.alive() && stranger.alive(), "nothing else is touched");
    for file in [&paths.overlay, &paths.vars, &paths.seed, &paths.pidfile, &paths.qmp] {
        assert!(!file.exists(), "{} removed", file.display());
    }
    assert!(!paths.run_dir.exists());
    assert!(stray.exists(), "a file the agent did not make survives, and so does its folder");
    assert_eq!(qemu.find_owned().await.unwrap(), vec![]);
    qemu.reap(&want).await.unwrap(); // idempotent
}
