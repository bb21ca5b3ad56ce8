//! The Qudata control plane (PROTOCOL.md §1): the client, the agent's identity towards it,
//! registration at start-up and the stats reporter.

pub mod backoff;
pub mod buffer;
pub mod client;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod register;
pub mod reporter;
pub mod wire;

pub use client::{Client, REQUEST_TIMEOUT};
pub use error::ClientError;
pub use identity::{FrpCredentials, Identity, IdentityError};
pub use register::{GpuFacts, HostProbe, Registered, register};
pub use reporter::{AgentStats, Reporter, StatsSource};
