//! Building blocks of the QEMU backend (DESIGN.md "Decisions": QMP, QEMU process).
//!
//! Each module does one thing and knows nothing of the instance manager:
//! - [`argv`]: the QEMU command line, a pure function of a [`argv::VmPlan`];
//! - [`accel`]: KVM or TCG, decided by a probe guest and cached per boot;
//! - [`disk`]: the qcow2 overlay on the base image, OVMF detection, per-VM VARS copy;
//! - [`seed`]: the NoCloud `cidata` seed, a vfat image built without mounting;
//! - [`process`]: spawning QEMU so it outlives the agent, reading its pidfile;
//! - [`vm_process`]: one QEMU process however it came (spawned, adopted, found), pinned by a
//!   pidfd, owned by one rule, stopped along a [`vm_process::Ladder`];
//! - [`qmp`]: a QMP client over the monitor socket, typed with `qapi-qmp`.
//!
//! A launch, in order: [`accel::choose`] (once, at start-up) → [`disk::detect_ovmf`] →
//! [`disk::copy_vars`] → [`disk::create_overlay`] → [`seed::build_seed`] →
//! (with GPUs: [`crate::vfio::Vfio::bind`]) → [`vm_process::VmProcess::spawn`] with
//! [`argv::qemu_argv`] →
//! [`process::Spawned::wait_for_path`] (QMP socket) → [`qmp::Qmp::connect`] →
//! `query_status` is `prelaunch` → `cont`. After an agent restart:
//! [`vm_process::VmProcess::adopt`] → [`qmp::Qmp::connect`]. Recovery:
//! [`procfs::ProcRoot::scan`] finds every QEMU of this agent, record or not. Delete, a failed
//! start or boot, orphans and `recover --stop-all` all end in [`vm_process::VmProcess::stop`].

pub mod accel;
pub mod argv;
pub mod confine;
pub mod console;
pub mod disk;
pub mod diskio;
pub mod gpus;
pub mod pin;
pub mod process;
pub mod procfs;
pub mod qmp;
pub mod seed;
pub mod sweeper;
pub mod topology;
pub mod vfat;

pub mod backend;
pub mod layout;
pub mod vm;
pub mod vm_process;

pub use backend::{QemuBackend, QemuSettings};
pub use sweeper::QemuSweeper;
