//! The agent API as an OpenAPI 3 document, made from the same router the agent serves
//! ([`super::routes`]): each handler's `#[utoipa::path]` is registered with its route, so a
//! route cannot exist without its entry. `openapi.json` at the repository root is this
//! document, checked by a test (`QUDATA_WRITE_OPENAPI=1 cargo test --lib openapi` writes it).
//!
//! Request bodies are read as JSON and validated by hand (`instance::spec`), so their schemas
//! here are documentation types: what the parser accepts, the legacy shapes included.

use std::collections::BTreeMap;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::instance::Status;

/// The header every route but `/ping` needs.
pub const SECRET_HEADER: &str = "X-Agent-Secret";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qudata-agent",
        description = "The host agent's API (PROTOCOL.md §2): one instance per host, its \
                       lifecycle and its renter SSH keys. Every answer is the envelope \
                       {\"ok\": true[, \"data\": …]} or {\"ok\": false, \"error\": \"…\"}."
    ),
    modifiers(&Secret),
    components(schemas(ErrorAnswer))
)]
pub struct ApiDoc;

struct Secret;

impl Modify for Secret {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let key = ApiKey::Header(ApiKeyValue::new(SECRET_HEADER));
        components.add_security_scheme("agent_secret", SecurityScheme::ApiKey(key));
    }
}

/// An error answer: one sentence.
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct ErrorAnswer {
    /// Always false.
    ok: bool,
    error: String,
}

/// What any authenticated route may answer besides its own statuses.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Refusals {
    /// No X-Agent-Secret header
    #[response(status = 401)]
    NoSecret(ErrorAnswer),
    /// Wrong secret
    #[response(status = 403)]
    WrongSecret(ErrorAnswer),
    /// The body did not arrive in time
    #[response(status = 408)]
    SlowBody(ErrorAnswer),
    /// Body over 64 KiB
    #[response(status = 413)]
    TooLarge(ErrorAnswer),
    /// No agent secret yet, or the request was not answered within 60 s
    #[response(status = 503)]
    Unavailable(ErrorAnswer),
}

/// What `POST /ssh` and `DELETE /ssh` answer besides [`Refusals`].
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum KeyAnswers {
    /// Done
    #[response(status = 200)]
    Done(OkAnswer),
    /// Not one OpenSSH public key line
    #[response(status = 400)]
    NotAKey(ErrorAnswer),
    /// There is no instance
    #[response(status = 404)]
    NoInstance(ErrorAnswer),
    /// SSH is not enabled, 64 keys already, or an operation is in progress
    #[response(status = 409)]
    Conflict(ErrorAnswer),
    /// The key could not be applied
    #[response(status = 500)]
    NotApplied(ErrorAnswer),
}

/// A success without data.
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct OkAnswer {
    /// Always true.
    ok: bool,
}

/// One published port (`container_port` or `guest_port`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PortRequest {
    #[schema(minimum = 1, maximum = 65535)]
    container_port: Option<u16>,
    /// The same as `container_port`.
    #[schema(minimum = 1, maximum = 65535)]
    guest_port: Option<u16>,
    #[schema(minimum = 1, maximum = 65535)]
    remote_port: Option<u16>,
    /// `tcp` or `http`.
    proto: Option<String>,
}

/// `POST /instances`. Every field is optional; the legacy shapes are accepted too
/// (`ports` as strings, `cpus` and `memory` as strings).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CreateRequest {
    /// A VM image known to the host, or a container reference on Docker hosts.
    image: Option<String>,
    image_tag: Option<String>,
    /// Objects, or the legacy strings (`["22", "8888"]`).
    #[schema(value_type = Option<Vec<serde_json::Value>>)]
    ports: Option<Vec<PortRequest>>,
    env_variables: Option<BTreeMap<String, String>>,
    command: Option<String>,
    ssh_enabled: Option<bool>,
    /// A count (or a numeric string).
    #[schema(value_type = Option<serde_json::Value>)]
    cpus: Option<u32>,
    /// `"8G"`, `"512M"`, or MiB as a number.
    #[schema(value_type = Option<serde_json::Value>)]
    memory: Option<String>,
    storage_gb: Option<u32>,
    gpus: Option<u32>,
    tunnel_token: Option<String>,
    registry: Option<String>,
    login: Option<String>,
    password: Option<String>,
}

/// What `POST /instances` answers.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CreatedAnswer {
    ok: bool,
    data: Created,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Created {
    id: String,
    status: Status,
    /// Guest port → the public port (local mode: the 127.0.0.1 host port).
    ports: BTreeMap<String, String>,
    /// The VM image the instance boots (VM hosts; a container `image` boots the default one).
    vm_image: Option<String>,
}

/// What `GET /instances` answers.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StatusAnswer {
    ok: bool,
    data: StatusView,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StatusView {
    status: Status,
    id: Option<String>,
    ports: Option<BTreeMap<String, String>>,
    gpus: Option<u32>,
    error: Option<String>,
    created_at: Option<String>,
    /// Guest port → why it is not public.
    port_errors: Option<BTreeMap<String, String>>,
    /// The VM image the instance boots (VM hosts).
    vm_image: Option<String>,
    /// The token of the JupyterLab the agent started (guest port 8888, no `command`).
    jupyter_token: Option<String>,
}

/// `PUT /instances`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LifecycleRequest {
    /// `start`, `stop` or `restart`.
    command: String,
}

/// `POST /ssh` and `DELETE /ssh`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SshKeyRequest {
    /// One OpenSSH public key line.
    ssh_pubkey: String,
}

/// The document of the router the agent serves.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, api) = super::routes().split_for_parts();
    api
}

/// The document as checked in: pretty JSON with a final newline.
pub fn rendered() -> String {
    let mut text = document().to_pretty_json().expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked_in() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
    }

    #[test]
    fn the_checked_in_document_is_the_codes() {
        let now = rendered();
        if std::env::var_os("QUDATA_WRITE_OPENAPI").is_some() {
            std::fs::write(checked_in(), &now).unwrap();
        }
        let file = std::fs::read_to_string(checked_in()).unwrap_or_default();
        assert!(
            file == now,
            "openapi.json is not the code's document: QUDATA_WRITE_OPENAPI=1 cargo test --lib \
             openapi writes it"
        );
    }

    #[test]
    fn every_route_is_documented_with_its_errors() {
        let api = document();
        let paths: Vec<&str> = api.paths.paths.keys().map(String::as_str).collect();
        assert_eq!(paths, ["/instances", "/ping", "/ssh"]);
        let json = serde_json::to_value(&api).unwrap();
        for (path, methods) in json["paths"].as_object().unwrap() {
            for (method, op) in methods.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("200"), "{method} {path}");
                if path != "/ping" {
                    assert!(responses.contains_key("401"), "{method} {path}: {responses:?}");
                    assert_eq!(op["security"][0]["agent_secret"], serde_json::json!([]));
                }
            }
        }
    }
}
