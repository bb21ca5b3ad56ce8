//! `/ssh`: add and remove a renter's public key.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::Value;

use super::AppState;
use super::envelope::{self, ApiError, JsonBody};
use super::openapi::{KeyAnswers, Refusals, SshKeyRequest};
use crate::instance::{KeyChange, ManagerError, spec};

/// The request's key, parsed (400 with the reason when it is not one OpenSSH key line).
fn pubkey(body: &Value) -> Result<String, ApiError> {
    let line = body.get("ssh_pubkey").and_then(Value::as_str).ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "ssh_pubkey: must be an OpenSSH public key line")
    })?;
    Ok(spec::parse_ssh_pubkey(line).map_err(ManagerError::from)?)
}

/// Adds a renter key (applied to a running guest at once).
#[utoipa::path(post, path = "/ssh", security(("agent_secret" = [])), request_body = SshKeyRequest, responses(
        KeyAnswers,
        Refusals,
))]
pub(super) async fn add(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    app.manager.change_ssh_key(KeyChange::Add(pubkey(&body)?)).await?;
    Ok(envelope::ok())
}

/// Removes a renter key.
#[utoipa::path(delete, path = "/ssh", security(("agent_secret" = [])), request_body = SshKeyRequest, responses(
        KeyAnswers,
        Refusals,
))]
pub(super) async fn remove(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    app.manager.change_ssh_key(KeyChange::Remove(pubkey(&body)?)).await?;
    Ok(envelope::ok())
}
