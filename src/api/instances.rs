//! `/instances`: create, status, lifecycle commands, delete.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::Value;

use super::AppState;
use super::envelope::{self, ApiError, JsonBody};
use crate::instance::{Lifecycle, ManagerError, spec};

pub(super) async fn status(State(app): State<AppState>) -> Json<Value> {
    envelope::data(app.manager.status_live().await)
}

pub(super) async fn create(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let spec = spec::parse_create(&body, app.manager.limits()).map_err(ManagerError::from)?;
    Ok(envelope::data(app.manager.create(spec).await?))
}

pub(super) async fn command(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let command = match body.get("command").and_then(Value::as_str) {
        Some("start") => Lifecycle::Start,
        Some("stop") => Lifecycle::Stop,
        Some("restart") => Lifecycle::Restart,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "command: must be \"start\", \"stop\" or \"restart\"",
            ));
        }
    };
    app.manager.lifecycle(command).await?;
    Ok(envelope::ok())
}

pub(super) async fn delete(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    app.manager.delete().await?;
    Ok(envelope::ok())
}
