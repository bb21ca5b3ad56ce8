//! qudata-agent: turns a bare-metal GPU server into rentable machines for the Qudata marketplace.
//!
//! The binary (`main.rs`) is a thin CLI over this library; see DESIGN.md for the module map.

pub mod agent;
pub mod api;
pub mod backend;
pub mod child_env;
pub mod config;
pub mod control_plane;
pub mod doctor;
pub mod fault;
pub mod fsutil;
#[cfg(test)]
mod fuzz;
pub mod gpu;
pub mod guest;
pub mod host;
pub mod instance;
pub mod network;
pub mod pidfd;
pub mod ports;
pub mod recovery;
pub mod secret;
pub mod sysuser;
pub mod text;
pub mod tunnel;
pub mod vfio;
