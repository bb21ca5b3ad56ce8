//! Finding this agent's QEMUs in `/proc`, through one injectable root (tests use a tree of
//! their own).
//!
//! A process is ours only when its command line carries both `-name qudata-<id>` and
//! `-pidfile <run dir>/vms/<id>/qemu.pid`: the marker alone would also match a QEMU of another
//! agent on the same host (parallel test runs, a second data dir), and a name alone matches
//! anything. Reading the command line again before every signal makes a reused pid harmless.

use std::path::{Path, PathBuf};

use super::layout::VmPaths;
use crate::instance::model::marker;

/// The `/proc` the backend reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcRoot(PathBuf);

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot(PathBuf::from("/proc"))
    }
}

/// The state letter of a `stat` file; it follows the command name, which is in parentheses
/// and may contain spaces.
fn task_state(stat: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat).ok()?;
    stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// A QEMU of this agent found in `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundQemu {
    pub pid: u32,
    pub instance_id: String,
}

impl ProcRoot {
    pub fn new(path: impl Into<PathBuf>) -> ProcRoot {
        ProcRoot(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `/proc/<pid>/cmdline`, NUL-separated.
    pub fn cmdline(&self, pid: u32) -> Option<Vec<u8>> {
        std::fs::read(self.0.join(pid.to_string()).join("cmdline")).ok()
    }

    /// The process exists and has not finished exiting: its leader is not a zombie, or some
    /// other thread still runs. (QEMU's leader turns zombie before its other threads are gone,
    /// and until the last one is, the process still holds its files: disk, VFIO devices.)
    pub fn is_alive(&self, pid: u32) -> bool {
        let dir = self.0.join(pid.to_string());
        match task_state(&dir.join("stat")) {
            None => false,
            Some('Z' | 'X') => std::fs::read_dir(dir.join("task"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|t| !matches!(task_state(&t.path().join("stat")), None | Some('Z' | 'X'))),
            Some(_) => true,
        }
    }

    /// Whether `pid` is alive and is instance `id`'s QEMU of the agent whose run dir is
    /// `run_dir`. Checked again right before each signal.
    pub fn is_ours(&self, pid: u32, id: &str, run_dir: &Path) -> bool {
        let Some(cmdline) = self.cmdline(pid) else { return false };
        self.is_alive(pid) && owner_of(&cmdline, run_dir).as_deref() == Some(id)
    }

    /// Every live QEMU of the agent whose run dir is `run_dir`, by pid.
    pub fn scan(&self, run_dir: &Path) -> Vec<FoundQemu> {
        let mut found: Vec<FoundQemu> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let instance_id = owner_of(&self.cmdline(pid)?, run_dir)?;
                self.is_alive(pid).then_some(FoundQemu { pid, instance_id })
            })
            .collect();
        found.sort_by_key(|f| f.pid);
        found
    }
}

/// The instance id a QEMU command line belongs to, when it carries `-name qudata-<id>` and
/// that instance's pidfile under `run_dir`.
pub fn owner_of(cmdline: &[u8], run_dir: &Path) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let value = |flag: &[u8]| {
        args.windows(2).find(|w| w[0] == flag).and_then(|w| std::str::from_utf8(w[1]).ok())
    };
    let id = value(b"-name")?.strip_prefix("qudata-")?;
    let plain = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let pidfile = VmPaths::new(Path::new("/"), run_dir, id).pidfile;
    (plain && marker(id) == value(b"-name")? && Path::new(value(b"-pidfile")?) == pidfile)
        .then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut out = args.join("\0").into_bytes();
        out.push(0);
        out
    }

    #[test]
    fn owner_needs_marker_and_pidfile_in_this_run_dir() {
        let run = Path::new("/run/q");
        let ours = cmd(&["qemu", "-name", "qudata-ab-1", "-pidfile", "/run/q/vms/ab-1/qemu.pid"]);
        assert_eq!(owner_of(&ours, run).as_deref(), Some("ab-1"));
        // Another agent's run dir, another instance's pidfile, no pidfile, no marker.
        let other = cmd(&["qemu", "-name", "qudata-ab-1", "-pidfile", "/run/x/vms/ab-1/qemu.pid"]);
        assert_eq!(owner_of(&other, run), None);
        let swapped = cmd(&["qemu", "-name", "qudata-ab-1", "-pidfile", "/run/q/vms/cd/qemu.pid"]);
        assert_eq!(owner_of(&swapped, run), None);
        assert_eq!(owner_of(&cmd(&["qemu", "-name", "qudata-ab-1"]), run), None);
        let foreign = cmd(&["qemu", "-name", "web", "-pidfile", "/run/q/vms/web/qemu.pid"]);
        assert_eq!(owner_of(&foreign, run), None);
        // An id that could climb out of the layout is never one of ours.
        let climb = cmd(&["qemu", "-name", "qudata-..", "-pidfile", "/run/q/vms/../qemu.pid"]);
        assert_eq!(owner_of(&climb, run), None);
    }

    fn fake_process(root: &Path, pid: u32, args: &[&str], state: char) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cmdline"), cmd(args)).unwrap();
        std::fs::write(dir.join("stat"), format!("{pid} (qemu sys) {state} 1 2 3")).unwrap();
    }

    #[test]
    fn scan_finds_live_owned_qemus_only() {
        let tmp = tempfile::tempdir().unwrap();
        let proc = ProcRoot::new(tmp.path());
        let run = Path::new("/run/q");
        let pidfile = |id: &str| format!("/run/q/vms/{id}/qemu.pid");
        fake_process(
            tmp.path(),
            40,
            &["qemu", "-name", "qudata-a", "-pidfile", &pidfile("a")],
            'S',
        );
        fake_process(
            tmp.path(),
            41,
            &["qemu", "-name", "qudata-b", "-pidfile", &pidfile("b")],
            'Z',
        );
        fake_process(tmp.path(), 42, &["qemu", "-name", "other", "-pidfile", &pidfile("c")], 'R');
        fake_process(tmp.path(), 7, &["bash"], 'S');
        std::fs::create_dir_all(tmp.path().join("self")).unwrap();
        let found = proc.scan(run);
        assert_eq!(found, vec![FoundQemu { pid: 40, instance_id: "a".into() }]);
        assert!(proc.is_ours(40, "a", run));
        assert!(!proc.is_ours(40, "b", run));
        assert!(!proc.is_ours(41, "b", run), "a zombie is gone");
        assert!(!proc.is_ours(99, "a", run), "no such process");
    }

    /// A leader that is a zombie while another thread still exits: not gone yet (it still
    /// holds its files); gone once every thread is.
    #[test]
    fn a_process_is_gone_only_when_its_last_thread_is() {
        let tmp = tempfile::tempdir().unwrap();
        let proc = ProcRoot::new(tmp.path());
        fake_process(tmp.path(), 50, &["qemu"], 'Z');
        let task = |tid: u32, state: char| {
            let dir = tmp.path().join("50/task").join(tid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), format!("{tid} (qemu sys) {state} 1 2 3")).unwrap();
        };
        task(50, 'Z');
        task(51, 'D');
        assert!(proc.is_alive(50), "a thread still exits");
        task(51, 'Z');
        assert!(!proc.is_alive(50));
        std::fs::remove_dir_all(tmp.path().join("50/task/51")).unwrap();
        assert!(!proc.is_alive(50), "only the zombie leader is left");
    }
}
