//! A value that must never reach a log line: its `Debug` and `Display` are redacted.

use std::fmt;

use subtle::ConstantTimeEq;

/// API key, agent secret, FRP token, admin password.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares in constant time (for the length of the longer value's prefix), so a caller
    /// cannot learn the secret byte by byte from response timing.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        !self.0.is_empty() && bool::from(self.0.as_bytes().ct_eq(candidate))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s}"), "<redacted>");
        assert!(!format!("{s:?}").contains("very"));
        assert!(!format!("{:?}", Some(&s)).contains("very"));
    }

    #[test]
    fn matches_only_the_exact_value() {
        let s = Secret::new("sk-abc");
        assert!(s.matches(b"sk-abc"));
        assert!(!s.matches(b"sk-abd"));
        assert!(!s.matches(b"sk-ab"));
        assert!(!s.matches(b""));
        assert!(!Secret::new("").matches(b""));
    }
}
