use super::*;

#[test]
fn overlay_argv_is_exact() {
    let argv = overlay_argv(Path::new("/img/base.qcow2"), Path::new("/vm/disk.qcow2"), 40);
    let expected =
        ["create", "-f", "qcow2", "-b", "/img/base.qcow2", "-F", "qcow2", "/vm/disk.qcow2", "40G"];
    assert_eq!(argv, expected);
    assert_eq!(info_argv(Path::new("/vm/disk.qcow2")), ["info", "--output=json", "/vm/disk.qcow2"]);
}

#[test]
fn qemu_img_sits_next_to_a_qemu_path() {
    assert_eq!(qemu_img_for(Path::new("qemu-system-x86_64")), PathBuf::from("qemu-img"));
    assert_eq!(
        qemu_img_for(Path::new("/opt/q/bin/qemu-system-x86_64")),
        Path::new("/opt/q/bin/qemu-img")
    );
}

fn touch(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, b"fw").unwrap();
    path.display().to_string()
}

#[test]
fn ovmf_detection_prefers_the_first_complete_pair_and_honours_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let code4m = d.join("CODE_4M.fd").display().to_string();
    let vars4m = d.join("VARS_4M.fd").display().to_string();
    let code = touch(d, "CODE.fd");
    let vars = touch(d, "VARS.fd");
    let candidates = [(code4m.as_str(), vars4m.as_str()), (code.as_str(), vars.as_str())];

    // The 4M pair is incomplete (missing), so the second pair is chosen.
    let found = detect_ovmf(None, None, &candidates).unwrap();
    assert_eq!(found, Ovmf { code: code.clone().into(), vars_template: vars.clone().into() });

    touch(d, "CODE_4M.fd");
    touch(d, "VARS_4M.fd");
    let found = detect_ovmf(None, None, &candidates).unwrap();
    assert_eq!(found.code, PathBuf::from(&code4m));

    let custom = touch(d, "MY_VARS.fd");
    let found = detect_ovmf(None, Some(Path::new(&custom)), &candidates).unwrap();
    assert_eq!(found, Ovmf { code: code4m.clone().into(), vars_template: custom.into() });

    let err = detect_ovmf(Some(Path::new("/nonexistent/CODE.fd")), None, &candidates).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/CODE.fd does not exist"), "{err}");
    let err = detect_ovmf(None, None, &[("/nonexistent/a", "/nonexistent/b")]).unwrap_err();
    assert!(err.to_string().contains("QUDATA_OVMF_CODE"), "{err}");
}

#[test]
fn vars_copy_is_a_separate_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = touch(dir.path(), "VARS.fd");
    let copy = dir.path().join("vm-vars.fd");
    copy_vars(Path::new(&template), &copy).unwrap();
    std::fs::write(&copy, b"changed").unwrap();
    assert_eq!(std::fs::read(&template).unwrap(), b"fw");
}

// The tests below run the real qemu-img (package qemu-utils).

fn qemu_img() -> PathBuf {
    PathBuf::from("qemu-img")
}

async fn make_image(path: &Path, format: &str, size: &str) {
    let status = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size)
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn overlay_is_backed_by_the_base_and_sized_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("disk.qcow2");
    make_image(&base, "qcow2", "1G").await;
    create_overlay(&qemu_img(), &base, &overlay, 3).await.unwrap();
    let info = image_info(&qemu_img(), &overlay).await.unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 3 * GIB);
    assert_eq!(info.backing_filename.as_deref(), Some(base.to_str().unwrap()));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    // An overlay holds only metadata until the guest writes: the base was not copied.
    assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20);

    let again = create_overlay(&qemu_img(), &base, &overlay, 3).await.unwrap_err();
    assert!(matches!(again, DiskError::OverlayExists { .. }), "{again}");
}

#[tokio::test]
async fn bad_bases_and_small_disks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("disk.qcow2");
    let missing = dir.path().join("missing.qcow2");
    let err = create_overlay(&qemu_img(), &missing, &overlay, 10).await.unwrap_err();
    assert!(matches!(err, DiskError::BaseMissing { .. }), "{err}");

    let raw = dir.path().join("base.raw");
    make_image(&raw, "raw", "1M").await;
    let err = create_overlay(&qemu_img(), &raw, &overlay, 10).await.unwrap_err();
    assert!(matches!(&err, DiskError::BaseFormat { format, .. } if format == "raw"), "{err}");

    let big = dir.path().join("big.qcow2");
    make_image(&big, "qcow2", "5G").await;
    let err = create_overlay(&qemu_img(), &big, &overlay, 4).await.unwrap_err();
    assert!(matches!(err, DiskError::TooSmall { requested: 4, base_gib: 5 }), "{err}");
    assert!(err.to_string().contains("ask for at least 5"), "{err}");
    assert!(!overlay.exists());
}

#[test]
fn a_disk_is_promised_to_the_overlays_that_may_still_grow() {
    const G: u64 = 1 << 30;
    assert_eq!(room_for(10 * G, 100 * G, 5 * G, &[]), Ok(()));
    assert_eq!(room_for(95 * G, 100 * G, 5 * G, &[]), Ok(()));
    // An instance of 50 GiB that has used 10 may still take 40 more.
    assert_eq!(room_for(55 * G, 100 * G, 5 * G, &[(50 * G, 10 * G)]), Ok(()));
    let err = room_for(56 * G, 100 * G, 5 * G, &[(50 * G, 10 * G)]).unwrap_err();
    assert_eq!(
        err,
        "not enough free disk for storage_gb 56: 100.0 GiB free, 5.0 GiB of it kept for the host \
         and 40.0 GiB for the instances already here to grow into"
    );
    // An overlay past its size (metadata) promises nothing more.
    assert_eq!(room_for(95 * G, 100 * G, 5 * G, &[(G, 2 * G)]), Ok(()));
    assert!(room_for(1, 4 * G, 5 * G, &[]).is_err(), "below the reserve nothing fits");
}
