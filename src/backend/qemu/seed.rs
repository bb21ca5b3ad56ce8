//! The NoCloud seed: a small vfat image labelled `CIDATA` holding `meta-data` and `user-data`.
//!
//! It is built without mounting (mkfs.vfat + mtools), so the agent needs no loop devices. It
//! carries only the hostname and the management key; everything else reaches the guest over SSH.

use std::path::{Path, PathBuf};

use super::vfat;

/// Size of the seed image. FAT12 needs a few hundred KiB at least; the files are tiny.
pub const SEED_KIB: u64 = 1024;

/// Building the seed failed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// mkfs.vfat or mcopy failed or could not run.
    #[error(transparent)]
    Tool(#[from] vfat::VfatError),
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
    vfat::run("mkfs.vfat", &vfat::mkfs_argv(&image, "CIDATA", SEED_KIB), seed).await?;
    vfat::run("mcopy", &vfat::mcopy_argv(&image, &[meta, user], "::"), seed).await?;
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
}
