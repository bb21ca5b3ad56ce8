//! `/ssh`: add and remove a renter's public key.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::Value;

use super::AppState;
use super::envelope::{self, ApiError, JsonBody};

fn pubkey(body: &Value) -> Result<&str, ApiError> {
    body.get("ssh_pubkey").and_then(Value::as_str).ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "ssh_pubkey: must be an OpenSSH public key line")
    })
}

pub(super) async fn add(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    app.manager.add_ssh_key(pubkey(&body)?).await?;
    Ok(envelope::ok())
}

pub(super) async fn remove(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    app.manager.remove_ssh_key(pubkey(&body)?).await?;
    Ok(envelope::ok())
}
