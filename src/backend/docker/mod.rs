//! The Docker backend (DESIGN.md "Docker backend"): each instance is one container, for hosts
//! whose GPUs cannot be passed through to a VM (no IOMMU).
//!
//! - [`plan`]: the container as a pure function of the record (name, label, ports on
//!   127.0.0.1, GPUs, limits, init, restart policy);
//! - [`engine`]: the bollard connection, every call under a deadline;
//! - [`pull`]: the image, pulled with progress in the log when the engine lacks it;
//! - [`sshd`]: an SSH server and the renter's keys, through the exec and archive APIs;
//! - [`watch`]: exits and restarts nobody asked for, reported to the manager;
//! - [`tar`]: the archives that carry files into a container.
//!
//! Recovery trusts only the labels ([`plan::LABEL_INSTANCE`] and [`plan::LABEL_OWNER`], see
//! [`owned`]): a container without them is never touched, whatever its name.

pub mod backend;
pub mod engine;
pub mod error;
pub mod machine;
pub mod network;
pub mod owned;
pub mod plan;
pub mod pull;
pub mod sshd;
pub mod tar;
pub mod watch;

pub use backend::{DockerBackend, DockerSettings};
pub use error::DockerError;
