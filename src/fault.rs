//! Deterministic crash points for the fault tests (`tests/it/faults.rs`), compiled into debug
//! builds only: with `QUDATA_TEST_CRASH_AT=<phase>` the agent sends itself SIGKILL when it
//! reaches that phase, which is exactly `kill -9` at a known moment (a test that sends the
//! signal from outside could only guess when the phase is reached). A release build has no
//! such variable and the calls compile to nothing.

/// The phases of a create where a test can crash the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The overlay exists; QEMU has not started.
    AfterOverlay,
    /// The GPUs are on vfio-pci (bind record written); QEMU has not started.
    AfterGpuBind,
    /// QEMU runs, still paused (`-S`): the agent has not sent `cont`.
    AfterQemuStart,
    /// The vCPUs run and the ports are published; the guest has not answered yet.
    BeforeGuestAnswers,
    /// A deletion stopped the VM's QEMU; its files, address and rules are still there.
    DuringTeardown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::AfterOverlay => "after_overlay",
            Phase::AfterGpuBind => "after_gpu_bind",
            Phase::AfterQemuStart => "after_qemu_start",
            Phase::BeforeGuestAnswers => "before_guest_answers",
            Phase::DuringTeardown => "during_teardown",
        }
    }
}

/// Kills the agent with SIGKILL if `QUDATA_TEST_CRASH_AT` names `phase` (debug builds only).
#[cfg(debug_assertions)]
pub fn crash_point(phase: Phase) {
    if std::env::var("QUDATA_TEST_CRASH_AT").as_deref() == Ok(phase.as_str()) {
        tracing::warn!(phase = phase.as_str(), "QUDATA_TEST_CRASH_AT: killing the agent");
        // SAFETY: kill(2) on this very process; SIGKILL cannot be caught, nothing runs after.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn crash_point(_phase: Phase) {}
