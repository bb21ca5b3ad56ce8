//! A small simulated kernel over a [`FakeSysfs`] tree: a watcher thread that reacts to writes
//! into `driver_override`, `<driver>/unbind`, `<driver>/bind` and `bus/pci/drivers_probe` the
//! way Linux's PCI core does, by moving the `driver` links.
//!
//! Linux semantics kept: `unbind` detaches the device from the driver it names; `bind` and
//! `drivers_probe` attach an unbound device to the driver named by its `driver_override`, or
//! (no override) to its native driver, and never to a driver the override excludes; a probe
//! of a bound device does nothing. A real write returns after the kernel acted; here the
//! writer sees the effect on the `driver` link shortly after, which is what the agent waits on.
//!
//! Faults on demand: [`SimKernel::refuse`] (a driver's probe fails for a device: it stays
//! unbound) and [`SimKernel::hang`] (an attribute turns into a FIFO without reader, so a
//! write into it blocks, like a write into a hung driver).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::sysfs::FakeSysfs;
use super::wait::wait_until_blocking;

/// How often the watcher looks at the write-side files.
const POLL: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Faults {
    /// (device, driver): that driver's probe of that device fails.
    refused: BTreeSet<(String, String)>,
}

struct Shared {
    root: PathBuf,
    /// Device → the driver its ids match (what a probe without override picks).
    native: BTreeMap<String, String>,
    faults: Mutex<Faults>,
    /// Every action taken, in order: `unbind <dev> <drv>`, `bind <dev> <drv>`,
    /// `probe <dev> refused by <drv>`, …
    log: Mutex<Vec<String>>,
    stop: AtomicBool,
}

pub struct SimKernel {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SimKernel {
    /// Starts the watcher. Each device's driver now is its native driver; `native` adds
    /// drivers for devices that start unbound.
    pub fn start(fake: &FakeSysfs, native: &[(&str, &str)]) -> SimKernel {
        let root = fake.path().to_owned();
        let mut map = BTreeMap::new();
        for entry in fs::read_dir(root.join("bus/pci/devices")).unwrap().flatten() {
            let addr = entry.file_name().to_string_lossy().into_owned();
            if let Some(driver) = fake.driver_of(&addr) {
                map.insert(addr, driver);
            }
        }
        for (addr, driver) in native {
            map.insert(addr.to_string(), driver.to_string());
        }
        let shared = Arc::new(Shared {
            root,
            native: map,
            faults: Mutex::default(),
            log: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            while !worker.stop.load(Ordering::Relaxed) {
                worker.sweep();
                std::thread::sleep(POLL);
            }
        });
        SimKernel { shared, thread: Some(thread) }
    }

    /// From now on, `driver`'s probe of `device` fails (it stays unbound).
    pub fn refuse(&self, device: &str, driver: &str) {
        let mut faults = self.shared.faults.lock().unwrap();
        faults.refused.insert((device.to_owned(), driver.to_owned()));
    }

    /// From now on a reset of `device` fails: its `reset` attribute refuses writes (the kernel
    /// answers a failed reset with an error from write(2)).
    pub fn fail_reset(&self, device: &str) {
        let path = self.shared.dev_dir(device).join("reset");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap(); // a write into a directory fails with EISDIR
    }

    /// Resets of `device` work again (undoes [`SimKernel::fail_reset`]).
    pub fn heal_reset(&self, device: &str) {
        let path = self.shared.dev_dir(device).join("reset");
        fs::remove_dir(&path).unwrap();
        fs::write(&path, "").unwrap();
    }

    /// Makes every write into the attribute at `relative` (from the sysfs root) block.
    pub fn hang(&self, relative: &str) {
        let path = self.shared.root.join(relative);
        fs::remove_file(&path).unwrap();
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Undoes [`SimKernel::hang`]: blocked writers are released (their write is lost) and the
    /// attribute is a plain file again.
    pub fn unhang(&self, relative: &str) {
        let path = self.shared.root.join(relative);
        release_fifo(&path);
        fs::remove_file(&path).unwrap();
        fs::write(&path, "").unwrap();
    }

    pub fn log(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Waits (deadline 60 s) until the log has a line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        let what = format!("{needle:?} in the kernel log");
        wait_until_blocking(what, Duration::from_secs(60), Duration::from_millis(10), || {
            let log = self.log();
            if log.iter().any(|l| l.contains(needle)) { Ok(()) } else { Err(format!("{log:?}")) }
        })
    }
}

impl Drop for SimKernel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Writers still blocked on a hung attribute get released.
        for path in fifos(&self.shared.root) {
            release_fifo(&path);
        }
    }
}

impl Shared {
    fn sweep(&self) {
        // First: a real reset is over when its write returns, before any later write.
        self.resets();
        let drivers = self.root.join("bus/pci/drivers");
        let names: Vec<String> = fs::read_dir(&drivers)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        for driver in &names {
            if let Some(dev) = take(&drivers.join(driver).join("unbind"))
                && self.driver_of(&dev).as_deref() == Some(driver)
            {
                self.detach(&dev, driver);
                self.note(format!("unbind {dev} {driver}"));
            }
        }
        for driver in &names {
            if let Some(dev) = take(&drivers.join(driver).join("bind")) {
                self.probe(&dev, Some(driver));
            }
        }
        if let Some(dev) = take(&self.root.join("bus/pci/drivers_probe")) {
            self.probe(&dev, None);
        }
    }

    /// A `1` written into a device's `reset`: the reset is logged with the driver it ran
    /// under. (A real reset happens inside the write; here it is seen shortly after, so a
    /// device that "does not come back" is made with `FakeSysfs::off_the_bus` beforehand.)
    fn resets(&self) {
        let devices = self.root.join("bus/pci/devices");
        for entry in fs::read_dir(&devices).into_iter().flatten().flatten() {
            let dev = entry.file_name().to_string_lossy().into_owned();
            if take(&self.dev_dir(&dev).join("reset")).is_none() {
                continue;
            }
            let driver = self.driver_of(&dev).unwrap_or_else(|| "none".into());
            self.note(format!("reset {dev} on {driver}"));
        }
    }

    /// `bind` (with `explicit`) or `drivers_probe` of one device.
    fn probe(&self, dev: &str, explicit: Option<&str>) {
        if !self.dev_dir(dev).is_dir() || self.driver_of(dev).is_some() {
            return self.note(format!("probe {dev} ignored"));
        }
        let over =
            fs::read_to_string(self.dev_dir(dev).join("driver_override")).unwrap_or_default();
        let over = over.trim();
        let over = (!over.is_empty() && over != "(null)").then_some(over);
        let chosen = match (explicit, over) {
            (Some(d), Some(o)) if d != o => return self.note(format!("bind {dev} {d} excluded")),
            (Some(d), _) => Some(d.to_owned()),
            (None, Some(o)) => Some(o.to_owned()),
            (None, None) => self.native.get(dev).cloned(),
        };
        let Some(driver) = chosen else { return self.note(format!("probe {dev} no driver")) };
        let refused =
            self.faults.lock().unwrap().refused.contains(&(dev.to_owned(), driver.clone()));
        if refused || !self.root.join("bus/pci/drivers").join(&driver).is_dir() {
            return self.note(format!("probe {dev} refused by {driver}"));
        }
        self.attach(dev, &driver);
        self.note(format!("bind {dev} {driver}"));
    }

    fn dev_dir(&self, dev: &str) -> PathBuf {
        self.root.join("bus/pci/devices").join(dev)
    }

    fn driver_of(&self, dev: &str) -> Option<String> {
        let link = fs::read_link(self.dev_dir(dev).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn attach(&self, dev: &str, driver: &str) {
        let real = fs::canonicalize(self.dev_dir(dev)).unwrap();
        let driver_dir = self.root.join("bus/pci/drivers").join(driver);
        symlink(&driver_dir, real.join("driver")).unwrap();
        symlink(&real, driver_dir.join(dev)).unwrap();
    }

    fn detach(&self, dev: &str, driver: &str) {
        let _ = fs::remove_file(self.dev_dir(dev).join("driver"));
        let _ = fs::remove_file(self.root.join("bus/pci/drivers").join(driver).join(dev));
    }

    fn note(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }
}

/// The value written into a plain attribute file since the last look, which is cleared.
/// FIFOs (hung attributes) are left alone: reading one would take the blocked write.
fn take(path: &Path) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() == 0 {
        return None;
    }
    let text = fs::read_to_string(path).ok()?;
    fs::write(path, "").ok()?;
    let value = text.trim().to_owned();
    (!value.is_empty()).then_some(value)
}

/// Opening the read side unblocks a writer waiting in open(2) on the FIFO.
fn release_fifo(path: &Path) {
    let _ = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path);
}

fn fifos(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("bus/pci/drivers"), root.join("devices")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_fifo() {
                out.push(entry.path());
            } else if kind.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    out
}
