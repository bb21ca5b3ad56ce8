//! Test support: the real agent binary, and doubles for what cannot exist here.

pub mod agent;
pub mod docker;
pub mod docker_agent;
pub mod docker_images;
pub mod frpc;
pub mod guests;
pub mod host;
pub mod install;
pub mod kernel;
pub mod mock_cp;
pub mod net;
pub mod nspawn;
pub mod nvml;
pub mod orphans;
pub mod records;
pub mod registry;
pub mod sandbox;
pub mod sshd;
pub mod sysfs;
pub mod vm;
pub mod wait;
