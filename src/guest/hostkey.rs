//! The guest's SSH host keys, learned from a channel only that VM can write: its serial
//! console, where cloud-init prints them at first boot (`-----BEGIN SSH HOST KEY KEYS-----`)
//! and the agent's images print them at every boot and whenever they change. One file per
//! instance holds the keys (OpenSSH public key lines, 0600, written atomically).
//!
//! A renter who is root in the guest can print anything on that console, but only about their
//! own VM: what the check keeps out is anyone else answering at the VM's address. A key not in
//! the file is accepted only when the console shows it; the VM keeps running when it does not
//! (the agent's access waits, and says why). A guest that never prints keys (no cloud-init
//! output on the serial port) is trusted on first contact after [`FIRST_CONTACT_GRACE`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

use crate::fsutil::{self, FsError};

/// How long an SSH server may answer with keys the console has not shown before it is
/// trusted on first contact (cloud-init prints them in its last stage, after sshd starts).
pub const FIRST_CONTACT_GRACE: Duration = Duration::from_secs(120);
/// How much of the end of the console log is read for key blocks.
const CONSOLE_SCAN: u64 = 1 << 20;
/// Lines of one block read at most (a real block has one line per key type).
const BLOCK_LINES: usize = 16;
const BEGIN: &str = "-----BEGIN SSH HOST KEY KEYS-----";
const END: &str = "-----END SSH HOST KEY KEYS-----";
/// cloud-init's last console line; a guest that printed it without keys prints none.
const CLOUD_INIT_DONE: &str = "finished at";

/// Why a server key was not accepted (mapped to `GuestError` by the client).
#[derive(Debug)]
pub(crate) enum PinError {
    /// A key the file does not hold and the console does not show.
    Changed {
        pinned: String,
        offered: String,
    },
    /// First contact, and the console has not shown the keys yet: try again.
    NotYet {
        offered: String,
    },
    Corrupt {
        path: PathBuf,
        reason: String,
    },
    Fs(FsError),
    Ssh(russh::Error),
}

impl From<russh::Error> for PinError {
    fn from(e: russh::Error) -> Self {
        PinError::Ssh(e)
    }
}

/// Where an instance's host keys are kept and learned from.
#[derive(Clone, Debug)]
pub struct HostKeys {
    /// The keys accepted (0600).
    pub file: PathBuf,
    /// The VM's serial console log; `None`: no channel (trust on first contact at once).
    pub console: Option<PathBuf>,
    /// When a server first answered with keys nothing had shown yet.
    waiting_since: Arc<Mutex<Option<Instant>>>,
}

impl HostKeys {
    pub fn new(file: PathBuf, console: Option<PathBuf>) -> HostKeys {
        HostKeys { file, console, waiting_since: Arc::default() }
    }

    /// Accepts `offered` when the file holds it or the console shows it (then the file is
    /// replaced by the console's block).
    pub(crate) fn check(&self, offered: &PublicKey) -> Result<(), PinError> {
        let known = read_keys(&self.file)?;
        if known.iter().any(|k| k.key_data() == offered.key_data()) {
            return Ok(());
        }
        let console = self.console.as_deref().map(|c| fsutil::read_tail(c, CONSOLE_SCAN));
        let blocks = console.as_deref().map(console_key_blocks).unwrap_or_default();
        if let Some(block) =
            blocks.iter().rev().find(|b| b.iter().any(|k| k.key_data() == offered.key_data()))
        {
            write_keys(&self.file, block)?;
            let keys: Vec<String> = block.iter().map(fingerprint).collect();
            if known.is_empty() {
                tracing::info!(file = %self.file.display(), ?keys, "learned the guest's SSH host keys from its console");
            } else {
                let before: Vec<String> = known.iter().map(fingerprint).collect();
                tracing::warn!(
                    file = %self.file.display(), ?before, ?keys,
                    "the guest's SSH host keys changed; learned the new ones from its console"
                );
            }
            return Ok(());
        }
        // Keys the console showed for this VM (or the file holds) that the server does not
        // offer: someone else answers.
        if let Some(pinned) = known.first().or_else(|| blocks.last().and_then(|b| b.first())) {
            return Err(PinError::Changed {
                pinned: fingerprint(pinned),
                offered: fingerprint(offered),
            });
        }
        let printed_none = console.as_deref().is_some_and(|c| c.contains(CLOUD_INIT_DONE));
        if self.console.is_none() || printed_none || self.waited(FIRST_CONTACT_GRACE) {
            write_keys(&self.file, std::slice::from_ref(offered))?;
            tracing::warn!(
                file = %self.file.display(), key = %fingerprint(offered),
                "the guest printed no SSH host keys on its console: trusting the first key it offered"
            );
            return Ok(());
        }
        Err(PinError::NotYet { offered: fingerprint(offered) })
    }

    /// Whether unverified answers have come for at least `grace` (starting the clock now).
    fn waited(&self, grace: Duration) -> bool {
        let mut since = self.waiting_since.lock().unwrap_or_else(|e| e.into_inner());
        since.get_or_insert_with(Instant::now).elapsed() >= grace
    }
}

fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

/// The key blocks a console shows, oldest first. A line may carry a prefix (cloud-init's
/// helper logs as `ec2: `); each key line is read from its key type on. A block without its
/// end line, or with no key, is ignored.
pub fn console_key_blocks(console: &str) -> Vec<Vec<PublicKey>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<PublicKey>> = None;
    let mut lines = 0;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if line.contains(BEGIN) {
            current = Some(Vec::new());
            lines = 0;
        } else if line.contains(END) {
            if let Some(block) = current.take().filter(|b| !b.is_empty()) {
                blocks.push(block);
            }
        } else if let Some(block) = current.as_mut() {
            lines += 1;
            if lines > BLOCK_LINES {
                current = None;
            } else if let Some(key) = key_in(line) {
                block.push(key);
            }
        }
    }
    blocks
}

/// The public key a console line holds, from its key type on.
fn key_in(line: &str) -> Option<PublicKey> {
    const TYPES: [&str; 5] =
        ["ssh-ed25519 ", "ecdsa-sha2-nistp", "ssh-rsa ", "sk-ssh-ed25519", "sk-ecdsa-sha2"];
    let at = TYPES.iter().filter_map(|t| line.find(t)).min()?;
    let mut fields = line[at..].split_whitespace();
    let (kind, body) = (fields.next()?, fields.next()?);
    PublicKey::from_openssh(&format!("{kind} {body}")).ok()
}

fn read_keys(path: &Path) -> Result<Vec<PublicKey>, PinError> {
    let Some(bytes) = fsutil::read_optional(path).map_err(PinError::Fs)? else {
        return Ok(Vec::new());
    };
    let corrupt = |reason: String| PinError::Corrupt { path: path.to_owned(), reason };
    let text = String::from_utf8(bytes).map_err(|e| corrupt(e.to_string()))?;
    let keys = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| PublicKey::from_openssh(l.trim()).map_err(|e| corrupt(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(corrupt("no key in the file".into()));
    }
    Ok(keys)
}

fn write_keys(path: &Path, keys: &[PublicKey]) -> Result<(), PinError> {
    let mut text = String::new();
    for key in keys {
        let mut key = key.clone();
        key.set_comment("");
        let line = key
            .to_openssh()
            .map_err(|e| PinError::Corrupt { path: path.to_owned(), reason: e.to_string() })?;
        text.push_str(line.trim());
        text.push('\n');
    }
    fsutil::write_atomic(path, text.as_bytes()).map_err(PinError::Fs)
}

/// Forgets the keys (instance deleted); a missing file is fine.
pub fn forget_host_key(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(FsError::Write { path: path.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}

/// The russh handler: its only job is the server-key decision.
pub(crate) struct Pinning {
    pub(crate) keys: HostKeys,
}

impl russh::client::Handler for Pinning {
    type Error = PinError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, PinError> {
        self.keys.check(&key.public_key())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
