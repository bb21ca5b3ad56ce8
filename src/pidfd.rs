//! A process pinned by a pidfd (Linux ≥ 5.3): a signal through it never reaches a later
//! process that reused the pid, and it says when the process is gone even when it is not
//! this agent's child (adopted after a restart). Used for QEMU and frpc alike.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A pidfd registered with the Tokio runtime (create it inside one).
#[derive(Debug)]
pub struct PidFd(AsyncFd<OwnedFd>);

impl PidFd {
    pub fn open(pid: u32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `owned` is a valid open fd that the AsyncFd owns for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }?;
        Ok(PidFd(fd))
    }

    /// Resolves once the whole thread group has exited, not when its leader has: the kernel
    /// makes a pidfd readable only when the leader is a zombie and no other thread is left.
    /// Seen on Linux 6.18 (a leader calling exit(2) while a second thread sleeps 2 s): the
    /// leader shows `Z` in /proc at once, epoll on its pidfd wakes only at 2.0 s. A QEMU
    /// whose leader exited first still holds its disk and VFIO devices until then.
    pub async fn exited(&self) {
        // Readiness is never cleared, so every later call resolves at once.
        let _ = self.0.readable().await;
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        let mut poll = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes only the one pollfd we own; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready > 0 && poll.revents & libc::POLLIN != 0
    }

    /// Sends `signal` to the pinned process; once it has exited this fails with ESRCH and
    /// reaches nobody.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let fd = self.0.as_raw_fd();
        let none = std::ptr::null::<libc::siginfo_t>();
        // SAFETY: pidfd_send_signal reads only our fd and the signal number; a null siginfo
        // asks the kernel to fill in its own.
        let sent = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd, signal, none, 0) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests;
