//! Bind records: for each instance, the devices it moved to vfio-pci and where each came from.
//! Written (atomically, 0600) before the first sysfs write, so a crash at any point can be
//! undone; removed once every device is verified back where it belongs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::VfioError;
use super::pci::PciAddress;
use crate::fsutil;

/// One device moved (or about to be moved) to vfio-pci.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundDevice {
    pub address: PciAddress,
    /// The driver it was on before the bind; `None` when unbound.
    pub original_driver: Option<String>,
    /// Its `driver_override` before the bind (hosts may set one themselves).
    pub original_override: Option<String>,
    /// The host keeps it on vfio-pci (`vfio-pci.ids`, or it was there before): release leaves
    /// it there instead of probing the original driver.
    pub keep_on_vfio: bool,
}

impl BoundDevice {
    /// The driver the device must end on when released.
    pub fn release_driver(&self) -> Option<&str> {
        if self.keep_on_vfio { Some(super::VFIO_PCI) } else { self.original_driver.as_deref() }
    }
}

/// What one instance holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindRecord {
    pub instance: String,
    pub devices: Vec<BoundDevice>,
}

/// `<dir>/<instance>.json`, one per instance.
pub fn path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(format!("{instance}.json"))
}

pub fn save(dir: &Path, record: &BindRecord) -> Result<(), VfioError> {
    fsutil::ensure_private_dir(dir)?;
    let json = serde_json::to_vec_pretty(record).expect("records always serialise");
    fsutil::write_atomic(&path(dir, &record.instance), &json)?;
    Ok(())
}

pub fn load(dir: &Path, instance: &str) -> Result<Option<BindRecord>, VfioError> {
    let path = path(dir, instance);
    let Some(bytes) = fsutil::read_optional(&path)? else { return Ok(None) };
    let record: BindRecord = serde_json::from_slice(&bytes)
        .map_err(|e| VfioError::RecordCorrupt { path: path.clone(), reason: e.to_string() })?;
    if record.instance != instance {
        let reason = format!("it names instance {}", record.instance);
        return Err(VfioError::RecordCorrupt { path, reason });
    }
    Ok(Some(record))
}

pub fn remove(dir: &Path, instance: &str) -> Result<(), VfioError> {
    let path = path(dir, instance);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(VfioError::Record(fsutil::FsError::Write { path, source: e }))
        }
        _ => Ok(()),
    }
}

/// Every record in `dir`, sorted by instance; none when the directory does not exist. A
/// corrupt record is an error, never skipped: it may be the only note of a GPU's driver.
pub fn load_all(dir: &Path) -> Result<Vec<BindRecord>, VfioError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(VfioError::Record(fsutil::FsError::Read { path: dir.to_owned(), source }));
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Temp files of an interrupted write start with a dot.
        if let Some(instance) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) {
            out.extend(load(dir, instance)?);
        }
    }
    out.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn records_round_trip_private_and_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("vfio");
        let record = BindRecord {
            instance: "abc".into(),
            devices: vec![BoundDevice {
                address: "0000:65:00.0".parse().unwrap(),
                original_driver: Some("nvidia".into()),
                original_override: None,
                keep_on_vfio: false,
            }],
        };
        assert!(load_all(&records).unwrap().is_empty(), "no directory yet");
        save(&records, &record).unwrap();
        let mode = std::fs::metadata(path(&records, "abc")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&records, "abc").unwrap(), Some(record.clone()));
        assert_eq!(load_all(&records).unwrap(), [record]);
        remove(&records, "abc").unwrap();
        remove(&records, "abc").unwrap();
        assert!(load_all(&records).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path(), "x"), "{").unwrap();
        assert!(matches!(load_all(dir.path()), Err(VfioError::RecordCorrupt { .. })));
    }
}
