//! Pinning a paused QEMU's threads as its [`Topology`] plans: each vCPU thread to its guest
//! node's host CPUs, every other thread (main loop, I/O thread, RCU, workers) to the CPUs kept
//! for the host. Done by the agent (root) between the paused start and `cont`: QEMU's seccomp
//! filter (`resourcecontrol=deny`) forbids QEMU to do it itself, and threads QEMU makes later
//! (its thread pool) inherit the affinity of the thread that makes them.

use std::path::PathBuf;

use super::topology::Topology;

/// A thread that could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot pin thread {tid} of QEMU to CPUs {cpus:?}: {source}")]
    Affinity { tid: u32, cpus: Vec<u32>, source: std::io::Error },
    #[error("cannot list QEMU's threads in {path}: {source}")]
    Threads { path: PathBuf, source: std::io::Error },
}

/// One vCPU as QMP's `query-cpus-fast` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuThread {
    pub index: u32,
    pub tid: u32,
}

/// Pins the threads of QEMU `pid` (its tasks under `proc_root`, `/proc`): vCPUs to their
/// node's CPUs, the others to the topology's I/O CPUs. Nothing is done where the plan says
/// "anywhere" (an empty set).
pub fn pin(
    proc_root: &std::path::Path,
    pid: u32,
    vcpus: &[VcpuThread],
    topology: &Topology,
) -> Result<(), PinError> {
    for v in vcpus {
        set_affinity(v.tid, topology.pin_of(v.index))?;
    }
    if topology.io_cpus.is_empty() {
        return Ok(());
    }
    let path = proc_root.join(pid.to_string()).join("task");
    let tasks = std::fs::read_dir(&path).map_err(|source| PinError::Threads { path, source })?;
    let others = tasks
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|tid| !vcpus.iter().any(|v| v.tid == *tid));
    for tid in others {
        match set_affinity(tid, &topology.io_cpus) {
            // A thread that ended since the listing (a pool worker) needs no pinning.
            Err(PinError::Affinity { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) => {}
            result => result?,
        }
    }
    Ok(())
}

/// `sched_setaffinity(tid, cpus)`; an empty set leaves the thread as it is.
pub fn set_affinity(tid: u32, cpus: &[u32]) -> Result<(), PinError> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it for any CPU below
    // CPU_SETSIZE (larger ones are skipped), and sched_setaffinity reads exactly its size.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|&&c| (c as usize) < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu as usize, &mut set);
        }
        libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result == 0 {
        Ok(())
    } else {
        let source = std::io::Error::last_os_error();
        Err(PinError::Affinity { tid, cpus: cpus.to_vec(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs a thread may run on, as the kernel reports them.
    fn allowed(tid: u32) -> String {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
        line.split_whitespace().nth(1).unwrap().to_owned()
    }

    #[test]
    fn a_thread_is_pinned_and_an_empty_set_changes_nothing() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = allowed(tid);
        set_affinity(tid, &[]).unwrap();
        assert_eq!(allowed(tid), before);
        set_affinity(tid, &[0]).unwrap();
        assert_eq!(allowed(tid), "0");
        let err = set_affinity(u32::MAX >> 2, &[0]).unwrap_err();
        assert!(err.to_string().contains("cannot pin thread"), "{err}");
        done_tx.send(()).unwrap();
        worker.join().unwrap();
    }
}
