//! In-guest GPU metrics (DESIGN.md "In-guest GPU metrics"): a GPU on vfio-pci is invisible to
//! the host, so the agent asks the guest. One long-lived SSH channel per VM runs
//! `nvidia-smi --query-gpu=… --format=csv,noheader,nounits -lms <interval>`; its lines are
//! parsed as they come and the latest values feed `/stats`.
//!
//! When: a stream starts for every VM once its guest is configured, in production mode (local
//! mode reports no stats). A guest without `nvidia-smi` (exit 127) ends it quietly when the
//! instance has no GPU, and is retried with back-off when it has some (the renter may install
//! the driver later). It stops with the VM, and is restarted after a reset or an adoption.

pub mod board;
pub mod parse;
pub mod stream;
pub mod streams;

pub use board::GuestGpuBoard;
pub use stream::StreamSpec;
pub use streams::GpuStreams;
