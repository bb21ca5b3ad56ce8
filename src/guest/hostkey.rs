//! Host-key pinning: trust on first contact, then only that key. One file per instance holding
//! the guest's OpenSSH public key line (0600, written atomically).

use std::path::{Path, PathBuf};

use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

use crate::fsutil::{self, FsError};

/// Why a server key was not accepted (mapped to `GuestError` by the client).
#[derive(Debug)]
pub(crate) enum PinError {
    Changed { pinned: String, offered: String },
    Corrupt { path: PathBuf, reason: String },
    Fs(FsError),
    Ssh(russh::Error),
}

impl From<russh::Error> for PinError {
    fn from(e: russh::Error) -> Self {
        PinError::Ssh(e)
    }
}

/// Accepts `offered` when it is the pinned key, or pins it when nothing is pinned yet.
pub(crate) fn check_or_pin(path: &Path, offered: &PublicKey) -> Result<(), PinError> {
    let fingerprint = |k: &PublicKey| k.fingerprint(HashAlg::Sha256).to_string();
    match fsutil::read_optional(path).map_err(PinError::Fs)? {
        Some(bytes) => {
            let corrupt = |reason: String| PinError::Corrupt { path: path.to_owned(), reason };
            let text = String::from_utf8(bytes).map_err(|e| corrupt(e.to_string()))?;
            let pinned =
                PublicKey::from_openssh(text.trim()).map_err(|e| corrupt(e.to_string()))?;
            if pinned.key_data() == offered.key_data() {
                Ok(())
            } else {
                Err(PinError::Changed {
                    pinned: fingerprint(&pinned),
                    offered: fingerprint(offered),
                })
            }
        }
        None => {
            let mut line = offered.clone();
            line.set_comment("");
            let text = line
                .to_openssh()
                .map_err(|e| PinError::Corrupt { path: path.to_owned(), reason: e.to_string() })?;
            fsutil::write_atomic(path, format!("{}\n", text.trim()).as_bytes())
                .map_err(PinError::Fs)?;
            tracing::info!(path = %path.display(), key = %fingerprint(offered), "pinned the guest's SSH host key");
            Ok(())
        }
    }
}

/// Forgets the pinned key (instance deleted); a missing file is fine.
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
    pub(crate) path: PathBuf,
}

impl russh::client::Handler for Pinning {
    type Error = PinError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, PinError> {
        check_or_pin(&self.path, &key.public_key())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::guest::ManagementKey;

    fn public(k: &ManagementKey) -> PublicKey {
        PublicKey::from_openssh(&k.public_line()).unwrap()
    }

    #[test]
    fn first_key_is_pinned_then_only_it_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_host");
        let (a, b) = (ManagementKey::generate(), ManagementKey::generate());
        check_or_pin(&path, &public(&a)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        check_or_pin(&path, &public(&a)).unwrap();
        match check_or_pin(&path, &public(&b)) {
            Err(PinError::Changed { pinned, offered }) => {
                assert_eq!(pinned, a.fingerprint());
                assert_eq!(offered, b.fingerprint());
            }
            other => panic!("{other:?}"),
        }
        forget_host_key(&path).unwrap();
        forget_host_key(&path).unwrap();
        check_or_pin(&path, &public(&b)).unwrap();
    }

    #[test]
    fn an_unreadable_pin_refuses_instead_of_repinning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_host");
        std::fs::write(&path, "junk").unwrap();
        let key = public(&ManagementKey::generate());
        assert!(matches!(check_or_pin(&path, &key), Err(PinError::Corrupt { .. })));
    }
}
