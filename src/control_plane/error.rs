//! What can go wrong talking to the control plane. Messages carry no request or response
//! body (they may hold credentials), only the path, the status and the server's `error` text.

/// A control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP client could not be built (TLS roots).
    #[error("cannot set up the HTTPS client: {detail}")]
    Build { detail: String },
    /// No answer: refused, unreachable, TLS failure or timeout.
    #[error(
        "the control plane at {url} did not answer {path}: {detail}; check QUDATA_SERVICE_URL and the network"
    )]
    Unreachable { url: String, path: &'static str, detail: String },
    /// A non-2xx status, or `ok:false`.
    #[error("the control plane answered {path} with {status}: {message}")]
    Refused { path: &'static str, status: u16, message: String },
    /// The body is not the envelope or not the expected `data`.
    #[error("the control plane's answer to {path} cannot be read: {detail}")]
    Malformed { path: &'static str, detail: String },
    /// A persisted identity file could not be written or read.
    #[error(transparent)]
    Identity(#[from] super::identity::IdentityError),
    /// `/init` sent no secret and none is stored: the agent API stays closed.
    #[error(
        "the control plane sent no agent secret and none is stored; the agent API stays closed until it does"
    )]
    NoSecret,
}

impl ClientError {
    /// Worth another try: no answer, too many requests, or a server error.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Refused { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}
