//! Test support: the real agent binary, and doubles for what cannot exist here.

pub mod agent;
pub mod mock_cp;
