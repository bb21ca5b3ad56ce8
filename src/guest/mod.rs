//! Guest configuration over SSH (DESIGN.md "Guest configuration"): the seed installs only the
//! management key; everything else (renter keys, the renter's command) goes over this russh
//! client with the guest's host key pinned on first contact.
//!
//! Nothing user-supplied is ever part of an exec command line: commands are fixed strings the
//! agent owns ([`GuestCommand`]), user values travel as stdin data or uploaded files.
//!
//! Typical use by a backend:
//! ```ignore
//! let key = ManagementKey::load_or_create(&data_dir.join("keys"))?;      // seed: key.public_line()
//! let target = GuestTarget::new(id, host_port, instance_dir.join("known_host"));
//! let session = GuestSession::new(target, key.clone()); // one per VM, for all of the below
//! session.connect_until(deadline).await?;                // readiness
//! let client = session.get().await?;                     // the live connection, or a new one
//! setup::set_authorized_keys(&client, &paths, Some(&key.public_line()), &renter_keys).await?;
//! setup::start_service(&client, &paths, &command, &env).await?;
//! ```

pub mod client;
pub mod command;
pub mod error;
pub mod hostkey;
pub mod keys;
pub mod metrics;
pub mod script;
pub mod session;
pub mod setup;

pub use client::{GuestClient, GuestCommand, GuestPath, GuestTarget, Output};
pub use error::GuestError;
pub use hostkey::{HostKeys, forget_host_key};
pub use keys::{KeyError, ManagementKey, parse_public_key_line};
pub use session::GuestSession;
pub use setup::GuestPaths;
