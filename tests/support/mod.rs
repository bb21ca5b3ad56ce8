//! Test support: the real agent binary, and doubles for what cannot exist here.

pub mod agent;
pub mod frpc;
pub mod host;
pub mod install;
pub mod kernel;
pub mod mock_cp;
pub mod orphans;
pub mod records;
pub mod sshd;
pub mod sysfs;
pub mod vm;
