//! The host's NVML handle, shared by the stats loop and the VM backend.
//!
//! An initialised NVML keeps `/dev/nvidia*` open, and the NVIDIA driver will not let a GPU go
//! (the unbind write blocks) while a process holds it. So the handle is let go while GPUs are
//! bound to vfio-pci ([`HostNvml::suspend`] … [`HostNvml::resume`]), and opened again after a
//! release ([`HostNvml::reload`]) so it sees the GPUs that came back.

use std::path::PathBuf;
use std::sync::Mutex;

use super::nvml::{Nvml, NvmlError};

type Loader = Box<dyn Fn() -> Result<Nvml, NvmlError> + Send + Sync>;

struct State {
    nvml: Option<Nvml>,
    /// Binds in progress; NVML stays closed while any runs.
    suspended: u32,
    /// The "no driver" line is written once.
    told: bool,
}

pub struct HostNvml {
    load: Loader,
    state: Mutex<State>,
}

impl std::fmt::Debug for HostNvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostNvml")
    }
}

impl HostNvml {
    /// Not loaded yet: the agent calls [`reload`](Self::reload) once stale binds are
    /// reconciled (GPUs returned to the driver are then seen). Without a driver the agent runs
    /// on, saying so in one line.
    pub fn new(library: PathBuf) -> HostNvml {
        HostNvml::with_loader(Box::new(move || Nvml::load(&library)))
    }

    fn with_loader(load: Loader) -> HostNvml {
        HostNvml { load, state: Mutex::new(State { nvml: None, suspended: 0, told: false }) }
    }

    fn load_now(&self, state: &mut State) {
        state.nvml = None; // nvmlShutdown before a new nvmlInit
        match (self.load)() {
            Ok(nvml) => {
                tracing::info!(gpus = nvml.count().unwrap_or(0), "NVML loaded");
                state.nvml = Some(nvml);
            }
            Err(e) if !state.told => {
                state.told = true;
                tracing::info!(reason = %e, "no NVIDIA driver on the host: GPU facts from the self-test inventory or PCI ids, GPU metrics from the guests only");
            }
            Err(e) => tracing::debug!(reason = %e, "NVML still not loadable"),
        }
    }

    /// Runs `f` with NVML, or returns `None` while there is none (no driver, suspended) or
    /// while it is being (re)loaded: callers are on the async runtime (the stats tick), and
    /// nvmlInit holds the lock for as long as the driver takes.
    pub fn with<T>(&self, f: impl FnOnce(&Nvml) -> T) -> Option<T> {
        let state = match self.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::WouldBlock) => return None,
            Err(std::sync::TryLockError::Poisoned(e)) => panic!("nvml lock: {e}"),
        };
        state.nvml.as_ref().map(f)
    }

    /// Lets NVML go (closing `/dev/nvidia*`) before GPUs are bound to vfio-pci.
    pub fn suspend(&self) {
        let mut state = self.state.lock().expect("nvml lock");
        state.suspended += 1;
        if state.nvml.take().is_some() {
            tracing::info!("NVML closed while GPUs are bound to vfio-pci");
        }
    }

    /// The bind is over (done or rolled back): NVML opens again once no bind runs. Blocking.
    pub fn resume(&self) {
        let mut state = self.state.lock().expect("nvml lock");
        state.suspended = state.suspended.saturating_sub(1);
        if state.suspended == 0 {
            self.load_now(&mut state);
        }
    }

    /// (Re)opens NVML, e.g. after GPUs went back to the host driver, so it sees them; waits
    /// while a bind runs. Blocking (dlopen, nvmlInit): call it off the async runtime.
    pub fn reload(&self) {
        let mut state = self.state.lock().expect("nvml lock");
        if state.suspended == 0 {
            self.load_now(&mut state);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A loader that counts its calls and never finds a driver (no NVML in unit tests).
    fn counting() -> (HostNvml, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let host = HostNvml::with_loader(Box::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            Nvml::load(std::path::Path::new("/nonexistent/libnvidia-ml.so.1"))
        }));
        (host, calls)
    }

    #[test]
    fn closed_during_binds_opened_after_the_last() {
        let (host, calls) = counting();
        assert_eq!(calls.load(Ordering::SeqCst), 0, "lazy");
        host.reload();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(host.with(|_| ()).is_none(), "no driver here");
        host.suspend();
        host.suspend();
        host.reload(); // a release during a bind waits for the bind
        host.resume();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "still one bind running");
        host.resume();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "opened again after the last bind");
        host.reload();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        host.resume(); // unbalanced: never below zero
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
