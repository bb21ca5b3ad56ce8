//! A task's side of `POST /ssh` and `DELETE /ssh`: the record changed at once, the running
//! guest changed after the operation in progress; a key that could not be applied is not
//! kept.

use tokio::time::Instant;

use super::{InstanceTask, Queued, Reply, Work, answer};
use crate::guest::keys::same_public_key;
use crate::instance::manager::{KeyChange, OP_WAIT};
use crate::instance::model::Status;
use crate::instance::transition::Conflict;

/// The most renter keys an instance holds (each is written to the guest on every change).
pub const MAX_RENTER_KEYS: usize = 64;

impl InstanceTask {
    pub(super) async fn change_keys(&mut self, change: KeyChange, reply: Reply) {
        let current = self.snapshot();
        if !current.spec.ssh_enabled {
            let reason = "SSH is not enabled for this instance (ssh_enabled was false)".into();
            return answer(Some(reply), Err(Conflict { status: current.status, reason }.into()));
        }
        let (key, add) = match change {
            KeyChange::Add(key) => (key, true),
            KeyChange::Remove(key) => (key, false),
        };
        let present = current.ssh_keys.iter().any(|k| same_public_key(k, &key));
        if present == add {
            return answer(Some(reply), Ok(())); // already as asked
        }
        if add && current.ssh_keys.len() >= MAX_RENTER_KEYS {
            let reason = format!(
                "the instance has {MAX_RENTER_KEYS} SSH keys, the most it may have; remove one first"
            );
            return answer(Some(reply), Err(Conflict { status: current.status, reason }.into()));
        }
        let changed = self
            .change(move |i| {
                if add {
                    i.ssh_keys.push(key);
                } else {
                    i.ssh_keys.retain(|k| !same_public_key(k, &key));
                }
                Ok(())
            })
            .await;
        if let Err(e) = changed {
            return answer(Some(reply), Err(e));
        }
        // A guest that is not reachable now gets the keys when it is (end of boot or resume).
        if current.status != Status::Running {
            return answer(Some(reply), Ok(()));
        }
        let previous = current.ssh_keys;
        let deadline = Some(Instant::now() + OP_WAIT);
        self.enqueue(Queued { work: Work::Keys { previous }, deadline, reply: Some(reply) });
        self.next().await;
    }
}
