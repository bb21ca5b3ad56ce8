//! The only things that become part of a command line the agent runs in a guest: fixed
//! command text and validated, agent-owned paths.

use std::borrow::Cow;

use super::error::GuestError;

/// A command line the agent owns. Built only from a `&'static str` or by the pure builders in
/// [`super::script`] from validated [`GuestPath`]s, so a user value can never become part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCommand(Cow<'static, str>);

impl GuestCommand {
    pub const fn fixed(command: &'static str) -> Self {
        GuestCommand(Cow::Borrowed(command))
    }

    pub(crate) fn built(command: String) -> Self {
        GuestCommand(Cow::Owned(command))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An absolute path in the guest made of plain characters (`A-Z a-z 0-9 / . _ -`), no `..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestPath(String);

impl GuestPath {
    pub fn new(path: &str) -> Result<Self, GuestError> {
        let bad = |reason| Err(GuestError::BadValue { value: path.to_owned(), reason });
        if !path.starts_with('/') || path.len() > 1024 {
            return bad("a guest path must be absolute and short");
        }
        if !path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b)) {
            return bad("a guest path may only hold letters, digits, '/', '.', '_' and '-'");
        }
        if path.split('/').any(|c| c == "..") {
            return bad("a guest path must not contain '..'");
        }
        Ok(GuestPath(path.trim_end_matches('/').to_owned()))
    }

    /// `self/name`, for the fixed file names the agent uses.
    pub fn join(&self, name: &'static str) -> GuestPath {
        GuestPath(format!("{}/{name}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_plain_absolute_paths() {
        assert_eq!(GuestPath::new("/run/qudata/").unwrap().as_str(), "/run/qudata");
        assert_eq!(
            GuestPath::new("/run/qudata").unwrap().join("x.env").as_str(),
            "/run/qudata/x.env"
        );
        for bad in ["run", "/a b", "/a/../etc", "/a'b", "/a$(id)", "/a\nb", ""] {
            assert!(GuestPath::new(bad).is_err(), "{bad:?}");
        }
    }
}
