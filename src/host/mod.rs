//! The host itself: what it is made of (registration) and how busy it is (telemetry).

pub mod address;
pub mod facts;
pub mod netdev;
pub mod sampler;

pub use facts::{HostFacts, Roots};
pub use sampler::{HostSample, Sampler};
