//! SSH keys: the agent's management key pair, and the one validator for OpenSSH public key
//! lines (the renter's `ssh_pubkey`, the management key in the NoCloud seed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngCore;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{LineEnding, PrivateKey, PublicKey};

use crate::fsutil::{self, FsError};

/// File name of the management private key inside the agent's key directory.
pub const MANAGEMENT_KEY_FILE: &str = "guest_ed25519";

/// Key types a renter may use. DSA is refused (OpenSSH disabled it); certificates are not keys.
const ALLOWED_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest accepted public key line (an RSA-16384 key is about 2.8 KiB in base64).
pub const MAX_PUBLIC_KEY_LINE: usize = 16 * 1024;

/// A key could not be made, stored, loaded or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "the management key {path} is not a valid OpenSSH ed25519 private key ({reason}); \
         move it away and restart the agent to make a new one"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot encode the management key: {reason}")]
    Encode { reason: String },
    #[error("{reason}")]
    BadPublicKey { reason: &'static str },
}

/// The ed25519 key pair the agent logs into its guests with. Its public line goes into the
/// NoCloud seed; the private half never leaves the host.
#[derive(Clone)]
pub struct ManagementKey {
    private: Arc<PrivateKey>,
}

impl std::fmt::Debug for ManagementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private half never reaches a log line; the fingerprint identifies the key.
        write!(f, "ManagementKey({})", self.fingerprint())
    }
}

impl ManagementKey {
    /// Loads `<dir>/guest_ed25519`, or makes one (0600, written atomically) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        let path = dir.join(MANAGEMENT_KEY_FILE);
        if let Some(bytes) = fsutil::read_optional(&path)? {
            return Self::decode(&path, &bytes);
        }
        fsutil::ensure_private_dir(dir)?;
        let key = Self::generate();
        let pem = key
            .private
            .to_openssh(LineEnding::LF)
            .map_err(|e| KeyError::Encode { reason: e.to_string() })?;
        fsutil::write_atomic(&path, pem.as_bytes())?;
        tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(), "made the guest management key");
        Ok(key)
    }

    /// A fresh key pair, in memory only.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        let pair = Ed25519Keypair::from_seed(&seed);
        seed.fill(0);
        let mut private = PrivateKey::from(pair);
        private.set_comment("qudata-agent");
        ManagementKey { private: Arc::new(private) }
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self, KeyError> {
        let corrupt = |reason: String| KeyError::Corrupt { path: path.to_owned(), reason };
        let private = PrivateKey::from_openssh(bytes).map_err(|e| corrupt(e.to_string()))?;
        if private.is_encrypted() || !matches!(private.key_data(), KeypairData::Ed25519(_)) {
            return Err(corrupt("not an unencrypted ed25519 key".into()));
        }
        Ok(ManagementKey { private: Arc::new(private) })
    }

    /// The OpenSSH public line (`ssh-ed25519 AAAA… qudata-agent`) for the seed's
    /// `public-keys` and the guest's `authorized_keys`.
    pub fn public_line(&self) -> String {
        // Encoding an in-memory ed25519 public key cannot fail.
        self.private.public_key().to_openssh().unwrap_or_default()
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.private.public_key().fingerprint(Default::default()).to_string()
    }

    pub(crate) fn private(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.private)
    }
}

/// Parses one OpenSSH public key line, `type base64 [comment]`, and returns it normalised
/// (single spaces, no surrounding whitespace). The body must decode to a key of the declared
/// type. Refused: `authorized_keys` options before the type (`command="…" ssh-ed25519 …`),
/// more than one line, NUL and other control characters, unknown types, certificates.
pub fn parse_public_key_line(line: &str) -> Result<String, KeyError> {
    fn bad<T>(reason: &'static str) -> Result<T, KeyError> {
        Err(KeyError::BadPublicKey { reason })
    }
    if line.len() > MAX_PUBLIC_KEY_LINE {
        return bad("is too long for an OpenSSH public key line");
    }
    let line = line.trim();
    if line.is_empty() {
        return bad(
            "is empty; expected an OpenSSH public key line like `ssh-ed25519 AAAA… me@laptop`",
        );
    }
    if line.contains(['\n', '\r']) {
        return bad("must be a single line (one key)");
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return bad("must not contain NUL or other control characters");
    }
    let mut parts = line.splitn(3, [' ', '\t']);
    let kind = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().trim();
    let comment = parts.next().map(str::trim).unwrap_or_default();
    if !ALLOWED_TYPES.contains(&kind) {
        return bad(
            "does not start with a supported key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-*); options are not accepted",
        );
    }
    if body.is_empty() {
        return bad("has no key body after the key type");
    }
    // Decoding the whole body (not just its type prefix) catches truncated or padded keys.
    let key = PublicKey::from_openssh(&format!("{kind} {body}"))
        .or_else(|_| bad("has a key body that is not a valid key of its declared type"))?;
    if key.algorithm().as_str() != kind {
        return bad("has a key body that does not match its key type");
    }
    Ok(if comment.is_empty() {
        format!("{kind} {body}")
    } else {
        format!("{kind} {body} {comment}")
    })
}

/// Whether two validated lines name the same key (comments aside).
pub fn same_public_key(a: &str, b: &str) -> bool {
    fn type_and_body(s: &str) -> Vec<&str> {
        s.split_whitespace().take(2).collect()
    }
    type_and_body(a) == type_and_body(b)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdj0ztsvqr9qxDpzEX9DHR4ZrCcGbiYfHqwMuX0MG0W";

    #[test]
    fn accepts_and_normalises_a_key_line() {
        assert_eq!(parse_public_key_line(ED25519).unwrap(), ED25519);
        assert_eq!(
            parse_public_key_line(&format!(" {ED25519}   me@laptop  two words \n")).unwrap(),
            format!("{ED25519} me@laptop  two words")
        );
        let tabbed = ED25519.replace(' ', "\t");
        assert_eq!(parse_public_key_line(&tabbed).unwrap(), ED25519);
    }

    #[test]
    fn refuses_anything_but_one_key() {
        let truncated = &ED25519[..ED25519.len() - 4];
        for bad in [
            String::new(),
            "   ".into(),
            "ssh-ed25519".into(),
            "ssh-ed25519 !!!notbase64".into(),
            truncated.into(),
            "ssh-dss AAAAB3NzaC1kc3M=".into(),
            ED25519.replace("ssh-ed25519", "ssh-rsa"),
            format!("command=\"touch /tmp/x\" {ED25519}"),
            format!("no-pty {ED25519}"),
            format!("{ED25519}\n{ED25519}"),
            format!("{ED25519} a\rb"),
            format!("{ED25519} a\0b"),
            format!("{ED25519}AAAA"),
        ] {
            assert!(parse_public_key_line(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_management_key_line_is_itself_valid() {
        let key = ManagementKey::generate();
        let line = key.public_line();
        assert!(line.starts_with("ssh-ed25519 ") && line.ends_with(" qudata-agent"), "{line}");
        assert_eq!(parse_public_key_line(&line).unwrap(), line);
        assert!(key.fingerprint().starts_with("SHA256:"));
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn management_key_is_made_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let made = ManagementKey::load_or_create(&keys).unwrap();
        let path = keys.join(MANAGEMENT_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let loaded = ManagementKey::load_or_create(&keys).unwrap();
        assert_eq!(loaded.public_line(), made.public_line());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "not rewritten");
    }

    #[test]
    fn a_corrupt_key_file_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANAGEMENT_KEY_FILE);
        std::fs::write(&path, "garbage").unwrap();
        let err = ManagementKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"garbage");
    }

    #[test]
    fn same_key_ignores_comments() {
        assert!(same_public_key(ED25519, &format!("{ED25519} c")));
        assert!(!same_public_key(ED25519, &ManagementKey::generate().public_line()));
    }
}
