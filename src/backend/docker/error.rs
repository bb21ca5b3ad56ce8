//! What can go wrong talking to the Docker engine, as sentences a user can act on.

use crate::backend::BackendError;

/// One failure of the Docker backend. `Display` is one sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerError {
    /// The engine refused a request (it answered, with an error status).
    #[error("the Docker engine refused to {what}: {message}")]
    Engine { what: &'static str, status: u16, message: String },
    /// The agent's network for containers (rules, port isolation) could not be set up.
    #[error("the containers' network: {detail}")]
    Network { detail: String },
    /// A command run in the container through the exec API failed.
    #[error("`{program}` in the container failed ({status}): {output}")]
    Exec { program: String, status: String, output: String },
    /// The name belongs to a container without this agent's label for the instance.
    #[error(
        "the container {name} is not this agent's (its label does not name the instance); left untouched"
    )]
    Foreign { name: String },
    /// The container image has neither an SSH server nor a way to install one.
    #[error(
        "the image has no SSH server and neither apt-get nor apk to install one; use an image \
         with openssh-server, or create the instance with ssh_enabled false"
    )]
    NoSshServer,
    /// The container does not exist (removed outside the agent, or never made).
    #[error("the container {name} does not exist")]
    NotFound { name: String },
    /// What the request asks for cannot be honoured on this engine.
    #[error("{reason}")]
    Refused { reason: String },
    /// Pulling the image failed; `message` is the engine's or the registry's.
    #[error("pulling the image {image} failed: {message}")]
    Pull { image: String, message: String },
    /// The engine did not finish in time.
    #[error("the Docker engine did not {what} within {seconds} s")]
    Timeout { what: &'static str, seconds: u64 },
    /// The engine's socket does not answer at all.
    #[error(
        "the Docker engine at {socket} does not answer ({detail}); start it (systemctl start docker)"
    )]
    Unreachable { socket: String, detail: String },
}

impl DockerError {
    /// Sorts a bollard error: an answer from the engine, or no answer at all.
    pub fn from_bollard(e: bollard::errors::Error, what: &'static str, socket: &str) -> Self {
        use bollard::errors::Error as B;
        match e {
            B::DockerResponseServerError { status_code, message } => DockerError::Engine {
                what,
                status: status_code,
                message: message.trim().to_owned(),
            },
            B::DockerStreamError { error } => {
                DockerError::Engine { what, status: 500, message: error }
            }
            other => {
                DockerError::Unreachable { socket: socket.to_owned(), detail: other.to_string() }
            }
        }
    }

    /// The engine answered 404 (no such container or image).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DockerError::Engine { status: 404, .. } | DockerError::NotFound { .. })
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, DockerError::Unreachable { .. } | DockerError::Timeout { .. })
    }

    /// As the backend's error for `operation`.
    pub fn during(self, operation: &'static str) -> BackendError {
        match self {
            DockerError::NotFound { .. } => BackendError::Gone { detail: self.to_string() },
            other => BackendError::op(operation, other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_answers_and_silence_are_told_apart() {
        let refused = bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            message: "No such container: qudata-x\n".into(),
        };
        let e = DockerError::from_bollard(refused, "inspect the container", "/run/d.sock");
        assert!(e.is_not_found() && !e.is_unreachable());
        assert_eq!(
            e.to_string(),
            "the Docker engine refused to inspect the container: No such container: qudata-x"
        );
        let gone = bollard::errors::Error::SocketNotFoundError("/run/d.sock".into());
        let e = DockerError::from_bollard(gone, "inspect the container", "/run/d.sock");
        assert!(e.is_unreachable());
        assert!(
            e.to_string().starts_with("the Docker engine at /run/d.sock does not answer"),
            "{e}"
        );
    }
}
