//! Small vfat images built without mounting (mkfs.vfat + mtools), so the agent needs no loop
//! devices: the NoCloud seed and the accelerator probe's EFI disk.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// A vfat tool failed or could not run.
#[derive(Debug, thiserror::Error)]
#[error("{tool} failed while building {path}: {detail}; install dosfstools and mtools")]
pub struct VfatError {
    pub tool: &'static str,
    pub path: PathBuf,
    pub detail: String,
}

/// How long one tool may take on an image of a few MiB.
const TOOL_DEADLINE: Duration = Duration::from_secs(60);

/// `mkfs.vfat` arguments creating the image file `image` of `kib` KiB labelled `label`.
pub fn mkfs_argv(image: &Path, label: &str, kib: u64) -> Vec<String> {
    let mut argv: Vec<String> = ["-n", label, "-C"].map(String::from).to_vec();
    argv.extend([image.display().to_string(), kib.to_string()]);
    argv
}

/// `mmd` arguments creating the directories `dirs` (parents first) in `image`.
pub fn mmd_argv(image: &Path, dirs: &[&str]) -> Vec<String> {
    let mut argv = vec!["-i".to_owned(), image.display().to_string()];
    argv.extend(dirs.iter().map(|d| format!("::/{d}")));
    argv
}

/// `mcopy` arguments copying `files` into the directory `dest` (`::` is the root) of `image`.
pub fn mcopy_argv(image: &Path, files: &[PathBuf], dest: &str) -> Vec<String> {
    let mut argv = vec!["-i".to_owned(), image.display().to_string()];
    argv.extend(files.iter().map(|f| f.display().to_string()));
    argv.push(dest.to_owned());
    argv
}

/// Runs `tool` with `argv` on `image`, bounded by a deadline (the child dies on drop, so hung
/// storage never holds the caller forever).
pub async fn run(tool: &'static str, argv: &[String], image: &Path) -> Result<(), VfatError> {
    let err = |detail: String| VfatError { tool, path: image.to_owned(), detail };
    let run = Command::new(tool)
        .args(argv)
        .env_clear()
        .envs(crate::child_env::for_child())
        // mtools checks the disk geometry of real floppies; an image file has none to check.
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TOOL_DEADLINE, run)
        .await
        .map_err(|_| err(format!("did not finish within {TOOL_DEADLINE:?}")))?
        .map_err(|e| err(format!("cannot run it: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(err(format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_argv_is_exact() {
        let image = Path::new("/vm/seed.img");
        assert_eq!(
            mkfs_argv(image, "CIDATA", 1024),
            ["-n", "CIDATA", "-C", "/vm/seed.img", "1024"]
        );
        assert_eq!(
            mmd_argv(image, &["EFI", "EFI/BOOT"]),
            ["-i", "/vm/seed.img", "::/EFI", "::/EFI/BOOT"]
        );
        let files = [PathBuf::from("/t/meta-data"), PathBuf::from("/t/user-data")];
        assert_eq!(
            mcopy_argv(image, &files, "::"),
            ["-i", "/vm/seed.img", "/t/meta-data", "/t/user-data", "::"]
        );
    }
}
