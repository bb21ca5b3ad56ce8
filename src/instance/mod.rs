//! The domain: what an instance is, how a request becomes one, where records live, and the
//! manager that is the single command surface over the backends.

pub mod manager;
pub mod model;
pub mod spec;
pub mod store;
pub mod transition;

pub use manager::{
    Created, KeyChange, Lifecycle, Manager, ManagerError, ManagerSettings, PublishError, Publisher,
    Restore, StatusView, Unavailable,
};
pub use model::{BackendKind, Instance, Proto, PublishedPort, Status};
