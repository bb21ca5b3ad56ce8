//! Building blocks of the QEMU backend (DESIGN.md "Decisions": QMP, QEMU process).
//!
//! Each module does one thing and knows nothing of the instance manager:
//! - [`argv`]: the QEMU command line, a pure function of a [`argv::VmPlan`];
//! - [`accel`]: KVM or TCG, decided by a probe guest and cached per boot;
//! - [`disk`]: the qcow2 overlay on the base image, OVMF detection, per-VM VARS copy;
//! - [`seed`]: the NoCloud `cidata` seed, a vfat image built without mounting;
//! - [`process`]: spawning QEMU so it outlives the agent, pidfile ownership, termination;
//! - [`qmp`]: a QMP client over the monitor socket, typed with `qapi-qmp`.

pub mod accel;
pub mod argv;
pub mod disk;
pub mod process;
pub mod qmp;
pub mod seed;
