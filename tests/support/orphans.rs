//! Cheap real QEMUs for recovery tests and benchmarks: no disk, no firmware run (`-S`,
//! `-machine none`), a monitor socket and a pidfile where the agent's layout puts them.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qudata_agent::backend::qemu::layout::VmPaths;

use super::wait::wait_until_blocking;

const QEMU: &str = "qemu-system-x86_64";

/// A QEMU started by a test; killed and reaped on drop if still running.
pub struct TestQemu {
    child: Child,
    pub paths: Option<VmPaths>,
}

impl TestQemu {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Alive and not a zombie (reaps it if it exited).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for TestQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[String], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(QEMU)
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        // Its own group, as the agent starts QEMU: a signal to the test's group misses it.
        .process_group(0)
        .spawn()
        .expect("start qemu-system-x86_64")
}

/// Waits until QEMU wrote its pidfile (it does so once its monitor is up).
fn wait_file(path: &Path) {
    let what = format!("QEMU to write {}", path.display());
    wait_until_blocking(what, Duration::from_secs(60), Duration::from_millis(20), || path.exists())
}

/// A QEMU with the agent's marker and every file of the layout that a launch makes before
/// QEMU runs (overlay, VARS, seed as empty stand-ins): what a crashed agent leaves behind.
pub fn orphan(data: &Path, run: &Path, id: &str) -> TestQemu {
    let paths = VmPaths::new(data, run, id);
    for dir in [&paths.dir, &paths.run_dir, paths.qmp.parent().unwrap()] {
        std::fs::create_dir_all(dir).unwrap();
    }
    for file in [&paths.overlay, &paths.vars, &paths.seed] {
        std::fs::write(file, b"").unwrap();
    }
    let args = [
        "-name".to_owned(),
        format!("qudata-{id}"),
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", paths.qmp.display()),
        "-pidfile".to_owned(),
        paths.pidfile.display().to_string(),
    ];
    let child = spawn(&args, &paths.qemu_log);
    wait_file(&paths.pidfile);
    TestQemu { child, paths: Some(paths) }
}

/// A QEMU that is not this agent's: `name` as its `-name`, its pidfile in `dir`.
pub fn foreign(dir: &Path, name: &str) -> TestQemu {
    std::fs::create_dir_all(dir).unwrap();
    let pidfile: PathBuf = dir.join(format!("{name}.pid"));
    let args =
        ["-name".to_owned(), name.to_owned(), "-pidfile".to_owned(), pidfile.display().to_string()];
    let child = spawn(&args, &dir.join(format!("{name}.log")));
    wait_file(&pidfile);
    TestQemu { child, paths: None }
}
