//! The NoCloud seed: a small vfat image labelled `CIDATA` holding `meta-data`, `user-data`
//! and, on the agent's bridge, `network-config`.
//!
//! It is built without mounting (mkfs.vfat + mtools), so the agent needs no loop devices. It
//! carries the hostname, the management key and what a stock cloud image needs to honour
//! them; everything else reaches the guest over SSH.
//!
//! The contract with stock images (Debian 12/13, Ubuntu 22.04/24.04 cloud images): their
//! `cloud.cfg` has a default user and `disable_root: true`, which would put the key behind a
//! "Please login as the user …" command for root; the agent logs in as root, so the seed
//! lifts it. Nothing here makes first boot slow: no package update or upgrade.

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

/// What the seed says about one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedContent<'a> {
    pub instance_id: &'a str,
    pub hostname: &'a str,
    /// The agent's management key (an OpenSSH public key line).
    pub management_public_key: &'a str,
    /// The MAC of the NIC on the agent's bridge: the guest asks the agent's DHCP server for
    /// its address there. `None`: no `network-config` (cloud-init's fallback, DHCP on the
    /// first NIC).
    pub mac: Option<&'a str>,
}

/// YAML double-quoted scalar. JSON string syntax is a subset of it, so no value can break out.
fn quoted(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The `meta-data` file.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!("instance-id: {}\nlocal-hostname: {}\n", quoted(instance_id), quoted(hostname))
}

/// The `user-data` file: the hostname, root login with the management key only, no
/// passwords, no package runs.
///
/// `ssh_authorized_keys` goes to the image's default user and, with `disable_root: false`, to
/// root without a forced command; the agent replaces both files with the renter's keys once
/// the guest answers (root's keeps the management key first).
pub fn user_data(hostname: &str, management_public_key: &str) -> String {
    format!(
        "#cloud-config\n\
         hostname: {host}\n\
         manage_etc_hosts: true\n\
         disable_root: false\n\
         ssh_pwauth: false\n\
         package_update: false\n\
         package_upgrade: false\n\
         ssh_authorized_keys:\n  - {key}\n",
        host = quoted(hostname),
        key = quoted(management_public_key.trim())
    )
}

/// The `network-config` file (version 2): DHCPv4 on the NIC with the agent's MAC, whatever
/// the guest names it; no IPv6 (the agent's network has none).
pub fn network_config(mac: &str) -> String {
    format!(
        "version: 2\nethernets:\n  qudata0:\n    match:\n      macaddress: {}\n    \
         dhcp4: true\n    dhcp6: false\n",
        quoted(&mac.to_ascii_lowercase())
    )
}

/// Writes the seed image to `seed` (replacing it whole): the two files are staged in a
/// directory beside `seed`, the image is built there and renamed into place.
pub async fn build_seed(seed: &Path, content: &SeedContent<'_>) -> Result<(), SeedError> {
    let mut staging = seed.as_os_str().to_owned();
    staging.push(".staging");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(write_err(&staging))?;
    let result = build_in(&staging, seed, content).await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError {
    let path = path.to_owned();
    move |source| SeedError::Write { path, source }
}

async fn build_in(staging: &Path, seed: &Path, content: &SeedContent<'_>) -> Result<(), SeedError> {
    let mut files = vec![
        (staging.join("meta-data"), meta_data(content.instance_id, content.hostname)),
        (staging.join("user-data"), user_data(content.hostname, content.management_public_key)),
    ];
    if let Some(mac) = content.mac {
        files.push((staging.join("network-config"), network_config(mac)));
    }
    for (path, text) in &files {
        std::fs::write(path, text).map_err(write_err(path))?;
    }
    let paths: Vec<PathBuf> = files.into_iter().map(|(path, _)| path).collect();
    let image = staging.join("seed.img");
    vfat::run("mkfs.vfat", &vfat::mkfs_argv(&image, "CIDATA", SEED_KIB), seed).await?;
    vfat::run("mcopy", &vfat::mcopy_argv(&image, &paths, "::"), seed).await?;
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
            "#cloud-config\n\
             hostname: \"qudata-3f2a\"\n\
             manage_etc_hosts: true\n\
             disable_root: false\n\
             ssh_pwauth: false\n\
             package_update: false\n\
             package_upgrade: false\n\
                 ssh_authorized_keys:\n  \
             - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0 qudata-agent\"\n"
        );
    }

    #[test]
    fn network_config_is_exact() {
        assert_eq!(
            network_config("52:54:00:AB:cd:01"),
            "version: 2\nethernets:\n  qudata0:\n    match:\n      macaddress: \
             \"52:54:00:ab:cd:01\"\n    dhcp4: true\n    dhcp6: false\n"
        );
    }

    #[test]
    fn values_cannot_break_out_of_their_line() {
        let text = user_data("h", "ssh-ed25519 AAAA x\nruncmd: [reboot] # \"");
        assert_eq!(text.lines().count(), 9);
        assert!(text.ends_with("  - \"ssh-ed25519 AAAA x\\nruncmd: [reboot] # \\\"\"\n"));
    }
}
