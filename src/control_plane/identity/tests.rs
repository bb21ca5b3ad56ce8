use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::control_plane::wire::FrpInit;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn init(secret: &str, frp: Option<FrpInit>, tunnel_token: Option<&str>) -> InitResponse {
    InitResponse {
        secret_key: Some(Secret::new(secret)),
        frp,
        tunnel_token: tunnel_token.map(str::to_owned),
        ..Default::default()
    }
}

#[test]
fn id_and_port_are_made_once_and_stay() {
    let dir = tempfile::tempdir().unwrap();
    let first = Identity::load_or_create(dir.path(), None).unwrap();
    assert_eq!(first.agent_id.get_version_num(), 4);
    assert!(PORT_RANGE.contains(&first.agent_port));
    let again = Identity::load_or_create(dir.path(), None).unwrap();
    assert_eq!((again.agent_id, again.agent_port), (first.agent_id, first.agent_port));
    assert!(again.secret().is_none());
    assert_eq!(mode(&dir.path().join(IDENTITY_FILE)), 0o600);
}

#[test]
fn the_port_setting_wins_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let first = Identity::load_or_create(dir.path(), None).unwrap();
    let set = Identity::load_or_create(dir.path(), Some(31999)).unwrap();
    assert_eq!((set.agent_id, set.agent_port), (first.agent_id, 31999));
    let later = Identity::load_or_create(dir.path(), None).unwrap();
    assert_eq!(later.agent_port, 31999);
}

#[test]
fn secret_is_stored_private_and_an_empty_one_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::load_or_create(dir.path(), None).unwrap();
    id.apply_init(&init("sk-first", None, None)).unwrap();
    assert_eq!(id.secret().unwrap().expose(), "sk-first");
    assert_eq!(mode(&dir.path().join(SECRET_FILE)), 0o600);

    let mut id = Identity::load_or_create(dir.path(), None).unwrap();
    assert_eq!(id.secret().unwrap().expose(), "sk-first", "read back after a restart");
    id.apply_init(&init("", None, None)).unwrap();
    id.apply_init(&InitResponse::default()).unwrap();
    assert_eq!(id.secret().unwrap().expose(), "sk-first");
    id.apply_init(&init("sk-second", None, None)).unwrap();
    let id = Identity::load_or_create(dir.path(), None).unwrap();
    assert_eq!(id.secret().unwrap().expose(), "sk-second");
}

#[test]
fn frp_credentials_persist_merge_and_yield_to_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut id = Identity::load_or_create(dir.path(), None).unwrap();
    let frp = FrpInit {
        server_addr: Some("frp.example".into()),
        server_port: Some(7000),
        token: Some(Secret::new("frp-token-1")),
        subdomain: None,
    };
    id.apply_init(&init("sk-1", Some(frp), Some("legacy-sub"))).unwrap();
    assert_eq!(mode(&dir.path().join(FRP_FILE)), 0o600);

    let id = Identity::load_or_create(dir.path(), None).unwrap();
    let stored = id.frp().clone();
    assert_eq!(stored.server_addr.as_deref(), Some("frp.example"));
    assert_eq!(stored.subdomain.as_deref(), Some("legacy-sub"), "tunnel_token fallback");
    assert!(stored.is_complete());

    let env = FrpOverrides {
        server: Some("10.0.0.1".into()),
        port: None,
        token: Some(Secret::new("env-token")),
        subdomain: None,
    };
    let effective = stored.with_overrides(&env);
    assert_eq!(effective.server_addr.as_deref(), Some("10.0.0.1"));
    assert_eq!(effective.server_port, Some(7000));
    assert_eq!(effective.token.unwrap().expose(), "env-token");
    assert_eq!(effective.subdomain.as_deref(), Some("legacy-sub"));
}

#[test]
fn a_damaged_file_is_named_without_its_content() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FRP_FILE), br#"{"token": sk-not-json"#).unwrap();
    let err = Identity::load_or_create(dir.path(), None).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("frp.json") && !text.contains("sk-not-json"), "{text}");
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, json};

    const KEYS: &[&str] = &[
        "ok",
        "data",
        "error",
        "secret_key",
        "host_exists",
        "frp",
        "server_addr",
        "server_port",
        "token",
        "subdomain",
        "tunnel_token",
        "instance_running",
    ];

    proptest! {
        #![proptest_config(config())]

        /// The `/init` answer, envelope and all: read or refused; an answer that is applied
        /// leaves an identity whose credentials are valid or absent.
        #[test]
        fn init_answers(status in prop_oneof![Just(200u16), 100u16..600], body in json(KEYS)) {
            let bytes = serde_json::to_vec(&body).unwrap();
            let Ok(data) = crate::control_plane::envelope::open("/init", status, &bytes) else {
                return Ok(());
            };
            let Ok(init) = serde_json::from_value::<InitResponse>(data) else { return Ok(()) };
            let dir = tempfile::tempdir().unwrap();
            let mut id = Identity::load_or_create(dir.path(), None).unwrap();
            if id.apply_init(&init).is_ok() {
                let _ = Identity::load_or_create(dir.path(), None).unwrap();
            }
        }
    }
}
