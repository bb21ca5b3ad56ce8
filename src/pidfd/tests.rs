//! The pidfd against the real kernel, with a process shaped like an exiting QEMU: its leader
//! is a zombie while another thread still runs.

use std::time::{Duration, Instant};

use super::PidFd;

const LINGER: Duration = Duration::from_secs(3);
const STACK: usize = 256 << 10;

extern "C" fn sleep_then_return(arg: *mut libc::c_void) -> libc::c_int {
    let none = std::ptr::null_mut::<libc::timespec>();
    // SAFETY: `arg` points at a timespec in the leader's stack frame, which stays mapped while
    // this thread shares the address space (the leader exits without unwinding it).
    unsafe { libc::syscall(libc::SYS_nanosleep, arg.cast::<libc::timespec>(), none) };
    0 // glibc's clone ends the thread with exit(2), not exit_group(2)
}

/// A child whose leader thread exits at once while a second thread lives on for [`LINGER`].
fn leader_exits_first() -> libc::pid_t {
    let mut stack = vec![0u8; STACK];
    let mut sleep = libc::timespec { tv_sec: LINGER.as_secs() as libc::time_t, tv_nsec: 0 };
    // SAFETY: fork has no memory preconditions; the child below makes only raw system calls,
    // as a child of a multi-threaded process must.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let top = (stack.as_mut_ptr() as usize + STACK) & !15;
        let flags = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM;
        let arg = (&raw mut sleep).cast::<libc::c_void>();
        // SAFETY: the new thread runs `sleep_then_return` on `stack` (allocated before the
        // fork, never freed in the child); both exits below end only the calling thread.
        unsafe {
            libc::clone(sleep_then_return, top as *mut libc::c_void, flags, arg);
            libc::syscall(libc::SYS_exit, 0);
        }
        unreachable!("exit(2) returned");
    }
    pid
}

/// (state of the leader, whether a thread other than the leader has not exited).
fn states(pid: libc::pid_t) -> (char, bool) {
    let state = |stat: std::path::PathBuf| {
        let stat = std::fs::read_to_string(stat).unwrap_or_default();
        stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).unwrap_or('-')
    };
    let leader = state(format!("/proc/{pid}/stat").into());
    let others = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    let other_alive = others
        .filter(|t| t.file_name().to_str() != Some(&pid.to_string()))
        .any(|t| !matches!(state(t.path().join("stat")), 'Z' | 'X' | '-'));
    (leader, other_alive)
}

#[tokio::test]
async fn exited_resolves_when_the_last_thread_is_gone_not_the_leader() {
    let pid = leader_exits_first();
    let pidfd = PidFd::open(pid as u32).unwrap();
    let until = Instant::now() + LINGER;
    while states(pid) != ('Z', true) {
        assert!(Instant::now() < until, "the leader never became a zombie beside a live thread");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pidfd.has_exited(), "a zombie leader with a live thread has not exited");
    tokio::time::timeout(LINGER * 5, pidfd.exited()).await.expect("exited after the last thread");
    assert!(!states(pid).1, "woke while a thread still ran");
    assert!(pidfd.has_exited());

    let mut status = 0;
    // SAFETY: waits for our own child; `status` is ours to write.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let esrch = pidfd.signal(0).unwrap_err().raw_os_error();
    assert_eq!(esrch, Some(libc::ESRCH), "a reaped process gets no signal, nor does its pid");
}

#[tokio::test]
async fn a_live_process_takes_signals_and_its_end_is_seen() {
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pidfd = PidFd::open(child.id()).unwrap();
    pidfd.signal(0).unwrap();
    assert!(!pidfd.has_exited());
    pidfd.signal(libc::SIGKILL).unwrap();
    tokio::time::timeout(Duration::from_secs(10), pidfd.exited()).await.unwrap();
    child.wait().unwrap();
    assert!(pidfd.has_exited());
}
