//! Instance records on disk: one JSON file per instance under `<data dir>/instances`, written
//! atomically with mode 0600.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::model::Instance;
use crate::fsutil::{self, FsError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("instance record {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot list {dir}: {source}")]
    List { dir: PathBuf, source: io::Error },
    #[error("cannot remove instance record {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// The folder of instance records.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let dir = data_dir.join("instances");
        fsutil::ensure_private_dir(&dir)?;
        Ok(Store { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the whole record; on failure the previous record is intact.
    pub fn save(&self, instance: &Instance) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(instance).expect("records always serialise");
        fsutil::write_atomic(&self.path(&instance.id), &json)?;
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Remove { path, source }),
        }
    }

    /// Every record, sorted by creation time. A corrupt record is an error, never skipped:
    /// it may describe a running VM holding GPUs.
    pub fn load_all(&self) -> Result<Vec<Instance>, StoreError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|source| StoreError::List { dir: self.dir.clone(), source })?;
        let mut out = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|source| StoreError::List { dir: self.dir.clone(), source })?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue; // temp files of an interrupted write
            }
            let bytes = fsutil::read_optional(&path)?.unwrap_or_default();
            let instance: Instance = serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt { path: path.clone(), reason: e.to_string() })?;
            if self.path(&instance.id) != path {
                let reason = format!("it holds instance {}", instance.id);
                return Err(StoreError::Corrupt { path, reason });
            }
            out.push(instance);
        }
        out.sort_by_key(|i| i.created_at);
        Ok(out)
    }
}
