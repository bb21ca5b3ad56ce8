//! Guests that fail to boot on purpose (`image-builder/build-test-guest.sh`), and the
//! agent's view of its accelerator, for the boot-truth tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use qudata_agent::backend::qemu::disk::{self, Ovmf};

use super::agent::Dirs;

/// The test guest of `kind` (`panic`, `silent`, `no-esp`), built once per run (the builder
/// caches by a stamp), installed in the agent's images dir as `<kind>-guest`: its name in a
/// create request.
pub fn install_test_guest(dirs: &Dirs, kind: &str) -> String {
    static BUILD: Mutex<()> = Mutex::new(());
    let image = {
        let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-guests");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("image-builder/build-test-guest.sh");
        let built = Command::new("bash").arg(&script).arg(kind).arg(&out).output().unwrap();
        assert!(
            built.status.success(),
            "building the {kind} test guest failed:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        out.join(format!("{kind}-guest.qcow2"))
    };
    let name = format!("{kind}-guest");
    install_image(dirs, &name, &image);
    name
}

/// A disk of zeros (no partition table at all), installed as the image `zeros`.
pub fn install_zeros(dirs: &Dirs) -> String {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("zeros.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1G")
        .status()
        .unwrap();
    assert!(made.success());
    install_image(dirs, "zeros", &image);
    "zeros".to_owned()
}

fn install_image(dirs: &Dirs, name: &str, image: &Path) {
    let images = dirs.data.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(image, images.join(format!("{name}.qcow2"))).unwrap();
}

/// The OVMF the agent finds by default.
pub fn host_ovmf() -> Ovmf {
    disk::detect_ovmf(None, None, disk::OVMF_CANDIDATES).expect("OVMF is installed")
}

/// The agent's default QEMU.
pub fn qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}
