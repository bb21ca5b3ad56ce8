//! `X-Agent-Secret` on every route except `GET /ping` (PROTOCOL.md §2, **compat** texts).

use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::envelope::ApiError;
use crate::secret::Secret;

/// The current agent secret; `None` until `/init` (or the stored file) gave one.
#[derive(Clone, Default)]
pub struct SecretSlot(Arc<RwLock<Option<Secret>>>);

impl SecretSlot {
    pub fn new(secret: Option<Secret>) -> Self {
        SecretSlot(Arc::new(RwLock::new(secret)))
    }

    pub fn set(&self, secret: Option<Secret>) {
        *self.0.write().expect("secret lock") = secret;
    }

    fn check(&self, presented: &[u8]) -> Option<bool> {
        self.0.read().expect("secret lock").as_ref().map(|s| s.matches(presented))
    }
}

pub(super) async fn require_secret(
    State(secret): State<SecretSlot>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() == Method::GET && request.uri().path() == "/ping" {
        return next.run(request).await;
    }
    let Some(presented) = request.headers().get("x-agent-secret") else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing X-Agent-Secret header")
            .into_response();
    };
    match secret.check(presented.as_bytes()) {
        Some(true) => next.run(request).await,
        Some(false) => ApiError::new(StatusCode::FORBIDDEN, "invalid secret").into_response(),
        // Fail closed: no secret from /init nor from disk.
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent has no secret yet; it has not registered with the control plane",
        )
        .into_response(),
    }
}
