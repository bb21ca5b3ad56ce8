//! `POST /ssh` and `DELETE /ssh`: the renter keys, kept in the record and applied to a
//! running guest at once (to a guest that is not reachable yet, when it is).

use super::{Manager, ManagerError, flows};
use crate::guest::keys::same_public_key;
use crate::instance::model::Status;

/// A change of the renter's keys; the key is one parsed OpenSSH public key line
/// (`spec::parse_ssh_pubkey`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChange {
    Add(String),
    Remove(String),
}

impl Manager {
    /// `POST /ssh` and `DELETE /ssh`.
    pub async fn change_ssh_key(&self, change: KeyChange) -> Result<(), ManagerError> {
        match change {
            KeyChange::Add(key) => self.change_keys(key, true).await,
            KeyChange::Remove(key) => self.change_keys(key, false).await,
        }
    }

    async fn change_keys(&self, key: String, add: bool) -> Result<(), ManagerError> {
        let slot = self.current().ok_or(ManagerError::NotFound)?;
        let current = slot.snapshot();
        if !current.spec.ssh_enabled {
            let reason = "SSH is not enabled for this instance (ssh_enabled was false)".into();
            let conflict = crate::instance::transition::Conflict { status: current.status, reason };
            return Err(conflict.into());
        }
        let present = current.ssh_keys.iter().any(|k| same_public_key(k, &key));
        if present == add {
            return Ok(()); // already as asked
        }
        self.update(&slot, move |i| {
            if add {
                i.ssh_keys.push(key);
            } else {
                i.ssh_keys.retain(|k| !same_public_key(k, &key));
            }
        })
        .await?;
        // A guest that is not reachable now gets the keys when it is (end of boot or resume).
        if current.status == Status::Running
            && let Err(e) = flows::apply_keys_now(self, &slot).await
        {
            // Not applied: the record goes back to what the guest has.
            let keys = current.ssh_keys.clone();
            self.update(&slot, move |i| i.ssh_keys = keys).await?;
            return Err(e);
        }
        Ok(())
    }
}
