//! `POST /ssh` and `DELETE /ssh`: the renter keys, kept in the record and applied to a
//! running guest at once (to a guest that is not reachable yet, when it is), by the
//! instance's task.

use super::task::Command;
use super::{Manager, ManagerError};

/// A change of the renter's keys; the key is one parsed OpenSSH public key line
/// (`spec::parse_ssh_pubkey`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChange {
    Add(String),
    Remove(String),
}

impl Manager {
    /// `POST /ssh` and `DELETE /ssh`: answered once applied to a running guest; a key that
    /// could not be applied is not kept.
    pub async fn change_ssh_key(&self, change: KeyChange) -> Result<(), ManagerError> {
        let task = self.current().ok_or(ManagerError::NotFound)?;
        task.ask(|reply| Command::Keys { change, reply }).await
    }
}
