//! The agent's HTTP API (PROTOCOL.md §2), on 127.0.0.1 only, published through the FRP tunnel.
//!
//! Every handler calls the instance manager and nothing else. Authentication wraps the whole
//! router, so an unauthenticated caller learns nothing about which paths exist.

mod auth;
mod envelope;
mod instances;
pub mod openapi;
mod server;
mod ssh;

use std::net::{Ipv4Addr, SocketAddr};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use auth::SecretSlot;
pub use envelope::ApiError;

use crate::instance::Manager;

/// Largest request body accepted (413 past it).
pub const BODY_LIMIT: usize = 64 * 1024;
/// The longest a request may take, body included (a lifecycle command waits up to 30 s for
/// the operation in progress, then for a pause or resume).
pub const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub manager: Manager,
}

/// Every route with its OpenAPI entry: what [`router`] serves and [`openapi::document`]
/// describes.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(utoipa_axum::routes!(ping))
        .routes(utoipa_axum::routes!(
            instances::status,
            instances::create,
            instances::command,
            instances::delete
        ))
        .routes(utoipa_axum::routes!(ssh::add, ssh::remove))
}

/// The router with authentication, body limit and JSON errors for every status.
pub fn router(manager: Manager, secret: SecretSlot) -> Router {
    let state = AppState { manager };
    let (routes, _) = routes().split_for_parts();
    let routes = routes
        .fallback(envelope::not_found)
        .method_not_allowed_fallback(envelope::method_not_allowed)
        .with_state(state);
    routes
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(envelope::deadline))
        .layer(axum::middleware::from_fn(envelope::json_errors))
        .layer(axum::middleware::from_fn_with_state(secret, auth::require_secret))
}

/// Whether the agent answers (no secret needed).
#[utoipa::path(get, path = "/ping", responses(
    (status = 200, description = "The agent answers", body = openapi::OkAnswer),
))]
async fn ping() -> axum::Json<serde_json::Value> {
    envelope::ok()
}

/// Binds 127.0.0.1:`port` (never another address).
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await
}

/// Serves until `shutdown` turns true, with the limits of [`server`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    server::serve(listener, app, shutdown).await
}
