//! The response envelope (**compat**): `{"ok":true[,"data":…]}` or `{"ok":false,"error":"…"}`,
//! for every status, including the ones axum produces itself.

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::backend::BackendError;
use crate::instance::ManagerError;

pub(super) fn ok() -> Json<Value> {
    Json(json!({"ok": true}))
}

pub(super) fn data(value: impl Serialize) -> Json<Value> {
    Json(json!({"ok": true, "data": value}))
}

/// An error answer: status and one sentence.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"ok": false, "error": self.message}))).into_response()
    }
}

/// A request that is not answered within [`super::REQUEST_DEADLINE`] (a body sent slowly, a
/// command stuck) gets 503 and its connection is closed.
pub(super) async fn deadline(request: Request, next: Next) -> Response {
    match tokio::time::timeout(super::REQUEST_DEADLINE, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let seconds = super::REQUEST_DEADLINE.as_secs();
            let message = format!("the request was not answered within {seconds} s");
            let mut response =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            response
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let status = match &e {
            ManagerError::Invalid(_) | ManagerError::Backend(BackendError::Unsupported { .. }) => {
                StatusCode::BAD_REQUEST
            }
            ManagerError::Conflict { .. }
            | ManagerError::Ports(_)
            | ManagerError::Resources(_)
            | ManagerError::Backend(BackendError::Refused { .. }) => StatusCode::CONFLICT,
            ManagerError::NotFound => StatusCode::NOT_FOUND,
            ManagerError::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ManagerError::Backend(_) | ManagerError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

/// The body as JSON, with the envelope's errors for a missing, oversized or malformed body.
pub(super) struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_limited(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body is empty"));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the request body is not valid JSON: {e}"),
            )
        })
    }
}

/// An oversized body up to this size is read and dropped before the 413 goes out: a client
/// still writing when the server closes gets a reset instead of the answer.
const DRAIN_CAP: usize = 4 * 1024 * 1024;
/// Time allowed for reading a body (and for draining an oversized one).
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The body, at most [`super::BODY_LIMIT`] bytes.
async fn read_limited(req: Request) -> Result<Vec<u8>, ApiError> {
    use futures_util::StreamExt;

    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut stream = req.into_body().into_data_stream();
    let unreadable =
        || ApiError::new(StatusCode::BAD_REQUEST, "the request body could not be read");
    let read = async {
        let mut body = Vec::new();
        let mut seen = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| unreadable())?;
            seen += chunk.len();
            if seen > DRAIN_CAP {
                break;
            }
            if seen <= super::BODY_LIMIT && declared.is_none_or(|n| n <= super::BODY_LIMIT) {
                body.extend_from_slice(&chunk);
            }
        }
        if seen > super::BODY_LIMIT || declared.is_some_and(|n| n > super::BODY_LIMIT) {
            return Err(too_large());
        }
        Ok(body)
    };
    tokio::time::timeout(BODY_DEADLINE, read).await.map_err(|_| {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")
    })?
}

fn too_large() -> ApiError {
    let limit = super::BODY_LIMIT / 1024;
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {limit} KiB"),
    )
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this method is not allowed on this route")
}

/// Rewrites any error response that is not already JSON (e.g. a framework rejection) into the
/// envelope, so a caller never has to parse plain text.
pub(super) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => return too_large().into_response(),
        s => s.canonical_reason().unwrap_or("request failed").to_lowercase(),
    };
    // Keep headers such as `Allow` of a 405; the body and its length are replaced.
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let mut fresh = ApiError::new(status, message).into_response();
    fresh.headers_mut().extend(parts.headers);
    fresh
}
