//! `/instances`: create, status, lifecycle commands, delete.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::Value;

use super::AppState;
use super::envelope::{self, ApiError, JsonBody};
use super::openapi::{
    CreateRequest, CreatedAnswer, ErrorAnswer, LifecycleRequest, OkAnswer, Refusals, StatusAnswer,
};
use crate::instance::{Lifecycle, ManagerError, spec};

/// The instance's status (`destroyed` when there is none).
#[utoipa::path(get, path = "/instances", security(("agent_secret" = [])), responses(
        (status = 200, description = "The status", body = StatusAnswer),
        Refusals,
))]
pub(super) async fn status(State(app): State<AppState>) -> Json<Value> {
    envelope::data(app.manager.status_live().await)
}

/// Creates the instance; it boots in the background (`pending`, then `running`).
#[utoipa::path(post, path = "/instances", security(("agent_secret" = [])), request_body = CreateRequest, responses(
        (status = 200, description = "Accepted: pending", body = CreatedAnswer),
        (status = 400, description = "A field is invalid (named in the error)", body = ErrorAnswer),
        (status = 409, description = "An instance exists, or the resources are not free", body = ErrorAnswer),
        Refusals,
        (status = 500, description = "The agent failed (its record could not be saved)", body = ErrorAnswer),
))]
pub(super) async fn create(
    State(app): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let spec = spec::parse_create(&body, app.manager.limits()).map_err(ManagerError::from)?;
    Ok(envelope::data(app.manager.create(spec).await?))
}

/// `start`, `stop` (pause) or `restart` the instance.
#[utoipa::path(put, path = "/instances", security(("agent_secret" = [])), request_body = LifecycleRequest, responses(
        (status = 200, description = "Done (stop, start) or under way (restart, boot)", body = OkAnswer),
        (status = 400, description = "Not a command", body = ErrorAnswer),
        (status = 404, description = "There is no instance", body = ErrorAnswer),
        (status = 409, description = "The command does not fit the instance's state", body = ErrorAnswer),
        Refusals,
        (status = 500, description = "The agent failed to carry it out", body = ErrorAnswer),
))]
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

/// Deletes the instance; the teardown goes on in the background.
#[utoipa::path(delete, path = "/instances", security(("agent_secret" = [])), responses(
        (status = 200, description = "Deletion under way", body = OkAnswer),
        (status = 404, description = "There is no instance", body = ErrorAnswer),
        Refusals,
        (status = 500, description = "The deletion could not be recorded", body = ErrorAnswer),
))]
pub(super) async fn delete(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    app.manager.delete().await?;
    Ok(envelope::ok())
}
