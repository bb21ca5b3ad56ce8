//! The NoCloud seed: a small vfat image labelled `CIDATA` holding `meta-data` and `user-data`.
//!
//! It is built without mounting (mkfs.vfat + mtools), so the agent needs no loop devices. It
//! carries only the hostname and the management key; everything else reaches the guest over SSH.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Size of the seed image. FAT12 needs a few hundred KiB at least; the files are tiny.
pub const SEED_KIB: u64 = 1024;

/// Building the seed failed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A tool failed or could not run.
    #[error(
        "{tool} failed while building the seed {path}: {detail}; install dosfstools and mtools"
    )]
    Tool { tool: &'static str, path: PathBuf, detail: String },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// YAML double-quoted scalar. JSON string syntax is a subset of it, so no value can break out.
fn quoted(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The `meta-data` file.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!("instance-id: {}\nlocal-hostname: {}\n", quoted(instance_id), quoted(hostname))
}

/// The `user-data` file: hostname and the agent's management key, nothing else.
pub fn user_data(hostname: &str, management_public_key: &str) -> String {
    format!(
        "#cloud-config\nhostname: {}\nssh_authorized_keys:\n  - {}\n",
        quoted(hostname),
        quoted(management_public_key.trim())
    )
}

/// `mkfs.vfat` arguments creating the image file `seed` of `kib` KiB.
pub fn mkfs_argv(seed: &Path, kib: u64) -> Vec<String> {
    let mut argv: Vec<String> = ["-n", "CIDATA", "-C"].map(String::from).to_vec();
    argv.extend([seed.display().to_string(), kib.to_string()]);
    argv
}

/// `mcopy` arguments copying `files` into the root of the image `seed`.
pub fn mcopy_argv(seed: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut argv = vec!["-i".to_owned(), seed.display().to_string()];
    argv.extend(files.iter().map(|f| f.display().to_string()));
    argv.push("::".into());
    argv
}

/// How long `mkfs.vfat` or `mcopy` may take on a 2 MiB image.
const TOOL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

async fn run(tool: &'static str, argv: &[String], seed: &Path) -> Result<(), SeedError> {
    let err = |detail: String| SeedError::Tool { tool, path: seed.to_owned(), detail };
    let run = Command::new(tool)
        .args(argv)
        .env_clear()
        .envs(crate::child_env::for_child())
        // mtools checks the disk geometry of real floppies; an image file has none to check.
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // Hung storage must not hold the instance's lock forever (the child dies on drop).
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

/// Writes the seed image to `seed` (replacing it whole): the two files are staged in a
/// directory beside `seed`, the image is built there and renamed into place.
pub async fn build_seed(
    seed: &Path,
    instance_id: &str,
    hostname: &str,
    management_public_key: &str,
) -> Result<(), SeedError> {
    let mut staging = seed.as_os_str().to_owned();
    staging.push(".staging");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(write_err(&staging))?;
    let result = build_in(&staging, seed, instance_id, hostname, management_public_key).await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError {
    let path = path.to_owned();
    move |source| SeedError::Write { path, source }
}

async fn build_in(
    staging: &Path,
    seed: &Path,
    instance_id: &str,
    hostname: &str,
    management_public_key: &str,
) -> Result<(), SeedError> {
    let meta = staging.join("meta-data");
    let user = staging.join("user-data");
    std::fs::write(&meta, meta_data(instance_id, hostname)).map_err(write_err(&meta))?;
    let user_text = user_data(hostname, management_public_key);
    std::fs::write(&user, user_text).map_err(write_err(&user))?;
    let image = staging.join("seed.img");
    run("mkfs.vfat", &mkfs_argv(&image, SEED_KIB), seed).await?;
    run("mcopy", &mcopy_argv(&image, &[meta, user]), seed).await?;
    std::fs::rename(&image, seed).map_err(write_err(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_is_exact() {
        assert_eq!(
            meta_data("3f2a", "qudata-3f2a"),
            "instance-id: \"3f2a\"\nlocal-hostname: \"qudata-3f2a\"\n"
        );
    }

    #[test]
    fn user_data_is_exact() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0 qudata-agent\n";
        assert_eq!(
            user_data("qudata-3f2a", key),
            "#cloud-config\nhostname: \"qudata-3f2a\"\nssh_authorized_keys:\n  \
             - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0 qudata-agent\"\n"
        );
    }

    #[test]
    fn values_cannot_break_out_of_their_line() {
        let text = user_data("h", "ssh-ed25519 AAAA x\nruncmd: [reboot] # \"");
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with("  - \"ssh-ed25519 AAAA x\\nruncmd: [reboot] # \\\"\"\n"));
    }

    #[test]
    fn tool_argv_is_exact() {
        let seed = Path::new("/vm/seed.img");
        assert_eq!(mkfs_argv(seed, 1024), ["-n", "CIDATA", "-C", "/vm/seed.img", "1024"]);
        let files = [PathBuf::from("/t/meta-data"), PathBuf::from("/t/user-data")];
        assert_eq!(
            mcopy_argv(seed, &files),
            ["-i", "/vm/seed.img", "/t/meta-data", "/t/user-data", "::"]
        );
    }
}
