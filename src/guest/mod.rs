//! Guest configuration over SSH (DESIGN.md "Guest configuration"): the seed installs only the
//! management key; everything else (renter keys, the renter's command) goes over this russh
//! client with the guest's host key pinned on first contact.
//!
//! Nothing user-supplied is ever part of an exec command line: commands are fixed strings the
//! agent owns ([`GuestCommand`]), user values travel as stdin data or uploaded files.

pub mod keys;

pub use keys::{KeyError, ManagementKey, parse_public_key_line};
