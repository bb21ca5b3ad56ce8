//! A VM's disks: a qcow2 overlay on the shared base image (never a copy of it) and its own
//! copy of the OVMF variables store; plus finding the OVMF firmware on the host.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::process::Command;

const GIB: u64 = 1 << 30;

/// Where Debian's `ovmf` package puts the firmware, best first: (code, vars template).
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
];

/// A disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image is not qcow2.
    #[error(
        "the base image {path} is {format}, not qcow2; convert it with `qemu-img convert -O qcow2`"
    )]
    BaseFormat { path: PathBuf, format: String },
    /// The base image is missing.
    #[error("the base image {path} does not exist; set QUDATA_BASE_IMAGE or build one")]
    BaseMissing { path: PathBuf },
    /// Copying the OVMF variables template failed.
    #[error("cannot copy the OVMF variables {from} to {to}: {source}")]
    CopyVars { from: PathBuf, to: PathBuf, source: std::io::Error },
    /// No OVMF firmware was found or an override does not exist.
    #[error(
        "no OVMF firmware found ({detail}); install the ovmf package or set QUDATA_OVMF_CODE and QUDATA_OVMF_VARS"
    )]
    Ovmf { detail: String },
    /// The overlay exists already; creating it again would wipe the VM's disk.
    #[error("the disk {path} already exists; destroy the instance first")]
    OverlayExists { path: PathBuf },
    /// `qemu-img` failed or could not run.
    #[error("qemu-img {action} failed: {detail}; install qemu-utils")]
    QemuImg { action: &'static str, detail: String },
    /// The requested disk is smaller than the base image.
    #[error(
        "storage_gb {requested} is smaller than the base image ({base_gib} GiB); ask for at least {base_gib}"
    )]
    TooSmall { requested: u64, base_gib: u64 },
}

/// What `qemu-img info --output=json` says about an image (the fields we use).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format", default)]
    pub backing_format: Option<String>,
}

/// `qemu-img` arguments that create `overlay` over `base`, `size_gb` GiB large.
pub fn overlay_argv(base: &Path, overlay: &Path, size_gb: u64) -> Vec<String> {
    let mut argv: Vec<String> = ["create", "-f", "qcow2", "-b"].map(String::from).to_vec();
    argv.push(base.display().to_string());
    argv.extend(["-F".into(), "qcow2".into(), overlay.display().to_string()]);
    argv.push(format!("{size_gb}G"));
    argv
}

/// `qemu-img` arguments that describe `image` as JSON.
pub fn info_argv(image: &Path) -> Vec<String> {
    vec!["info".into(), "--output=json".into(), image.display().to_string()]
}

/// How long one `qemu-img` run may take (an overlay or `info` is metadata only: milliseconds).
const QEMU_IMG_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

async fn qemu_img(
    binary: &Path,
    action: &'static str,
    argv: &[String],
) -> Result<Vec<u8>, DiskError> {
    let run = Command::new(binary)
        .args(argv)
        .env_clear()
        .envs(crate::child_env::for_child())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // Hung storage must not hold the instance's lock forever (the child dies on drop).
    let output = tokio::time::timeout(QEMU_IMG_DEADLINE, run)
        .await
        .map_err(|_| DiskError::QemuImg {
            action,
            detail: format!("{binary:?} did not finish within {QEMU_IMG_DEADLINE:?}"),
        })?
        .map_err(|e| DiskError::QemuImg {
            action,
            detail: format!("cannot run {binary:?}: {e}"),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(DiskError::QemuImg { action, detail: format!("{}: {stderr}", output.status) });
    }
    Ok(output.stdout)
}

/// Describes an image with `qemu-img info`.
pub async fn image_info(qemu_img_binary: &Path, image: &Path) -> Result<ImageInfo, DiskError> {
    let out = qemu_img(qemu_img_binary, "info", &info_argv(image)).await?;
    serde_json::from_slice(&out)
        .map_err(|e| DiskError::QemuImg { action: "info", detail: format!("unreadable JSON: {e}") })
}

/// Creates the VM's disk: a qcow2 overlay `storage_gb` GiB large whose backing file is `base`
/// (checked to exist, be qcow2 and be no larger than `storage_gb`). Refuses to overwrite.
pub async fn create_overlay(
    qemu_img_binary: &Path,
    base: &Path,
    overlay: &Path,
    storage_gb: u64,
) -> Result<(), DiskError> {
    // The overlay records the backing path; an absolute one stays valid wherever QEMU runs.
    let base = std::fs::canonicalize(base)
        .map_err(|_| DiskError::BaseMissing { path: base.to_owned() })?;
    if overlay.exists() {
        return Err(DiskError::OverlayExists { path: overlay.to_owned() });
    }
    let info = image_info(qemu_img_binary, &base).await?;
    if info.format != "qcow2" {
        return Err(DiskError::BaseFormat { path: base, format: info.format });
    }
    if storage_gb.saturating_mul(GIB) < info.virtual_size {
        let base_gib = info.virtual_size.div_ceil(GIB);
        return Err(DiskError::TooSmall { requested: storage_gb, base_gib });
    }
    qemu_img(qemu_img_binary, "create", &overlay_argv(&base, overlay, storage_gb)).await?;
    Ok(())
}

/// `qemu-img` next to `qemu_binary` when that is a path, else `qemu-img` from `PATH`.
pub fn qemu_img_for(qemu_binary: &Path) -> PathBuf {
    match qemu_binary.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir.join("qemu-img"),
        None => PathBuf::from("qemu-img"),
    }
}

/// The firmware a VM boots: a shared read-only code image and the template of its variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// Finds OVMF. Overrides win (each must exist); an unset one is taken from the first
/// candidate pair whose files exist (a code override picks the vars of its own pair).
pub fn detect_ovmf(
    code: Option<&Path>,
    vars: Option<&Path>,
    candidates: &[(&str, &str)],
) -> Result<Ovmf, DiskError> {
    for path in [code, vars].into_iter().flatten() {
        if !path.is_file() {
            return Err(DiskError::Ovmf { detail: format!("{} does not exist", path.display()) });
        }
    }
    if let (Some(code), Some(vars)) = (code, vars) {
        return Ok(Ovmf { code: code.to_owned(), vars_template: vars.to_owned() });
    }
    let found = candidates.iter().map(|(c, v)| (Path::new(c), Path::new(v))).find(|(c, v)| {
        let code_ok = code.is_none_or(|want| want == *c) && c.is_file();
        code_ok && (vars.is_some() || v.is_file())
    });
    match found {
        Some((c, v)) => Ok(Ovmf {
            code: code.unwrap_or(c).to_owned(),
            vars_template: vars.unwrap_or(v).to_owned(),
        }),
        None => {
            let looked: Vec<&str> = candidates.iter().map(|(c, _)| *c).collect();
            Err(DiskError::Ovmf { detail: format!("looked for {}", looked.join(", ")) })
        }
    }
}

/// Gives a VM its own writable copy of the variables template (UEFI writes boot entries).
pub fn copy_vars(template: &Path, dest: &Path) -> Result<(), DiskError> {
    std::fs::copy(template, dest).map(|_| ()).map_err(|source| DiskError::CopyVars {
        from: template.to_owned(),
        to: dest.to_owned(),
        source,
    })
}

/// Disk kept free for the host (GiB): the largest `storage_gb` leaves this much, and each
/// create checks it again.
pub const HOST_DISK_RESERVE_GB: u64 = 5;

/// Whether `wanted` bytes fit on a disk with `free` bytes, keeping `reserve` for the host and
/// room for each held overlay (`(size, allocated)`) to grow to its full size. The refusal is
/// one sentence in GiB.
pub fn room_for(wanted: u64, free: u64, reserve: u64, held: &[(u64, u64)]) -> Result<(), String> {
    let promised: u64 = held.iter().map(|(size, used)| size.saturating_sub(*used)).sum();
    let left = free.saturating_sub(reserve).saturating_sub(promised);
    if wanted <= left {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(format!(
        "not enough free disk for storage_gb {:.0}: {:.1} GiB free, {:.1} GiB of it kept for the \
         host and {:.1} GiB for the instances already here to grow into",
        gib(wanted),
        gib(free),
        gib(reserve),
        gib(promised)
    ))
}

#[cfg(test)]
mod tests;
