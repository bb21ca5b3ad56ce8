//! What recovery looks at: the records, the processes and containers the backend owns, the
//! files the agent's layout names, the GPUs in the bind record, and the lease.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::gpus::BoundGpu;
use crate::backend::Owned;
use crate::backend::qemu::layout::VmPaths;
use crate::instance::model::Instance;

/// Everything the planner decides from.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub records: Vec<Instance>,
    /// What carries the agent's marker (QEMU processes, containers), record or not.
    pub owned: Vec<Owned>,
    pub files: Vec<FoundFile>,
    /// Devices the agent's bind records say it moved to vfio-pci.
    pub bound_gpus: Vec<BoundGpu>,
    /// `/init`'s `instance_running`; `None` without a control plane (`recover`, or before
    /// `/init` answers).
    pub lease: Option<bool>,
}

/// Which of the agent's files a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    Overlay,
    Vars,
    Seed,
    SerialLog,
    QemuLog,
    KnownHosts,
    QmpSocket,
    Pidfile,
    /// An frpc include file (one per instance).
    Include,
    /// Found where the agent keeps its files, but not a name the agent makes: never touched.
    Foreign,
}

/// One file found under the agent's directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundFile {
    pub path: PathBuf,
    /// The instance the layout ties it to, if any.
    pub id: Option<String>,
    pub kind: FileKind,
}

/// An instance id as the agent makes them (and as a directory name may hold one).
pub fn plain_id(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn entries(dir: &Path) -> Vec<(String, PathBuf, bool)> {
    let mut out: Vec<(String, PathBuf, bool)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            (e.file_name().to_string_lossy().into_owned(), e.path(), is_dir)
        })
        .collect();
    out.sort();
    out
}

/// Every file under `<data>/vms`, `<run>/vms`, the monitor sockets' `<run>/qmp` and the frpc
/// include dir, named by the layout or marked [`FileKind::Foreign`].
pub fn scan_files(data_dir: &Path, run_dir: &Path, include_dir: Option<&Path>) -> Vec<FoundFile> {
    let mut out = Vec::new();
    for base in [data_dir.join("vms"), run_dir.join("vms")] {
        for (name, path, is_dir) in entries(&base) {
            if !is_dir || !plain_id(&name) {
                out.push(FoundFile { path, id: None, kind: FileKind::Foreign });
                continue;
            }
            let layout = VmPaths::new(data_dir, run_dir, &name);
            for (_, file, _) in entries(&path) {
                let kind = layout_kind(&layout, &file);
                out.push(FoundFile { path: file, id: Some(name.clone()), kind });
            }
        }
    }
    for (name, path, is_dir) in entries(&run_dir.join("qmp")) {
        let id = name.strip_suffix(".sock").filter(|id| plain_id(id) && !is_dir);
        let kind = if id.is_some() { FileKind::QmpSocket } else { FileKind::Foreign };
        out.push(FoundFile { path, id: id.map(str::to_owned), kind });
    }
    for (name, path, is_dir) in include_dir.map(entries).unwrap_or_default() {
        let id = name.strip_suffix(".toml").filter(|id| plain_id(id) && !is_dir);
        let kind = if id.is_some() { FileKind::Include } else { FileKind::Foreign };
        out.push(FoundFile { path, id: id.map(str::to_owned), kind });
    }
    out
}

fn layout_kind(p: &VmPaths, file: &Path) -> FileKind {
    let named = [
        (&p.overlay, FileKind::Overlay),
        (&p.vars, FileKind::Vars),
        (&p.seed, FileKind::Seed),
        (&p.serial_log, FileKind::SerialLog),
        (&p.serial_log_old, FileKind::SerialLog),
        (&p.qemu_log, FileKind::QemuLog),
        (&p.known_hosts, FileKind::KnownHosts),
        (&p.legacy_qmp, FileKind::QmpSocket),
        (&p.pidfile, FileKind::Pidfile),
    ];
    named.iter().find(|(path, _)| path.as_path() == file).map_or(FileKind::Foreign, |(_, k)| *k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_by_the_layout_or_left_foreign() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, run, inc) = (tmp.path().join("d"), tmp.path().join("r"), tmp.path().join("i"));
        let p = VmPaths::new(&data, &run, "ab");
        for dir in [&p.dir, &p.run_dir, &inc, &run.join("qmp")] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let files =
            [&p.overlay, &p.pidfile, &p.qmp, &p.dir.join("mine.txt"), &data.join("vms/loose")];
        for f in files {
            std::fs::write(f, "").unwrap();
        }
        std::fs::write(inc.join("ab.toml"), "").unwrap();
        std::fs::write(inc.join("README"), "").unwrap();
        let found = scan_files(&data, &run, Some(&inc));
        let kinds: Vec<(String, Option<&str>, FileKind)> = found
            .iter()
            .map(|f| {
                let rel = f.path.strip_prefix(tmp.path()).unwrap().display().to_string();
                (rel, f.id.as_deref(), f.kind)
            })
            .collect();
        let want: Vec<(String, Option<&str>, FileKind)> = vec![
            ("d/vms/ab/disk.qcow2".into(), Some("ab"), FileKind::Overlay),
            ("d/vms/ab/mine.txt".into(), Some("ab"), FileKind::Foreign),
            ("d/vms/loose".into(), None, FileKind::Foreign),
            ("r/vms/ab/qemu.pid".into(), Some("ab"), FileKind::Pidfile),
            ("r/qmp/ab.sock".into(), Some("ab"), FileKind::QmpSocket),
            ("i/README".into(), None, FileKind::Foreign),
            ("i/ab.toml".into(), Some("ab"), FileKind::Include),
        ];
        assert_eq!(kinds, want);
    }
}
