use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::control_plane::Identity;

const GO_ID: &str = "6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b";
const GO_SECRET_VALUE: &str = "sk-go-agent-secret-0123456789";

/// The frpc config the Go agent v0.0.9a renders (internal/frpc/config.go), with its agent proxy.
const GO_FRPC: &str = r#"serverAddr = "frp.example.test"
serverPort = 7000

[auth]
method = "token"
token = "go-frp-token-abc"

[transport]
tcpMuxKeepaliveInterval = 30
dialServerKeepalive = 30

[log]
to = "console"
level = "debug"

[[proxies]]
name = "agent-6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b"
type = "http"
customDomains = ["tunnel-abc-12345"]
localIP = "127.0.0.1"
localPort = 12345
"#;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A data dir as the Go agent leaves it: `agent_id` without a newline, `agent_secret`, both
/// 0600 (internal/storage/store.go), and its frpc config.
fn go_layout() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in
        [("agent_id", GO_ID), ("agent_secret", GO_SECRET_VALUE), ("api_key", "ak-x")]
    {
        let path = dir.path().join(name);
        std::fs::write(&path, value).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let frpc = dir.path().join("frpc.toml");
    std::fs::write(&frpc, GO_FRPC).unwrap();
    (dir, frpc)
}

#[test]
fn takes_over_id_secret_and_frp_server_once_and_leaves_the_go_files() {
    let (dir, frpc) = go_layout();
    let data = dir.path();
    let done = import(data, &frpc, None).unwrap().expect("imported");
    assert_eq!(done, GoImport { agent_id: GO_ID.parse().unwrap(), secret: true, frp_server: true });

    let identity = Identity::load_or_create(data, None).unwrap();
    assert_eq!(identity.agent_id.to_string(), GO_ID);
    assert!(super::super::PORT_RANGE.contains(&identity.agent_port));
    assert_eq!(identity.secret().unwrap().expose(), GO_SECRET_VALUE);
    let frp = identity.frp();
    assert_eq!(frp.server_addr.as_deref(), Some("frp.example.test"));
    assert_eq!(frp.server_port, Some(7000));
    assert_eq!(frp.token.as_ref().unwrap().expose(), "go-frp-token-abc");
    assert_eq!(frp.subdomain, None, "the Go agent stored none; /init's tunnel_token gives it");
    for name in [IDENTITY_FILE, SECRET_FILE, FRP_FILE, IMPORT_RECORD] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
    let record = std::fs::read_to_string(data.join(IMPORT_RECORD)).unwrap();
    assert!(record.contains(GO_ID) && !record.contains(GO_SECRET_VALUE), "{record}");
    // The Go agent's own files are as it left them.
    assert_eq!(std::fs::read_to_string(data.join("agent_id")).unwrap(), GO_ID);
    assert_eq!(std::fs::read_to_string(data.join("agent_secret")).unwrap(), GO_SECRET_VALUE);
    assert_eq!(std::fs::read_to_string(&frpc).unwrap(), GO_FRPC);

    // Never again, not even once this agent's identity is removed to register anew.
    assert_eq!(import(data, &frpc, None).unwrap(), None);
    std::fs::remove_file(data.join(IDENTITY_FILE)).unwrap();
    assert_eq!(import(data, &frpc, None).unwrap(), None);
    let fresh = Identity::load_or_create(data, None).unwrap();
    assert_ne!(fresh.agent_id.to_string(), GO_ID);
}

#[test]
fn an_existing_identity_secret_or_frp_file_is_never_overwritten() {
    let (dir, frpc) = go_layout();
    let data = dir.path();
    let mine = Identity::load_or_create(data, None).unwrap();
    assert_eq!(import(data, &frpc, None).unwrap(), None, "this agent already has an identity");
    assert_eq!(Identity::load_or_create(data, None).unwrap().agent_id, mine.agent_id);
    assert!(!data.join(IMPORT_RECORD).exists());

    let (dir, frpc) = go_layout();
    let data = dir.path();
    fsutil::write_atomic(&data.join(SECRET_FILE), b"sk-mine").unwrap();
    fsutil::write_atomic(&data.join(FRP_FILE), br#"{"subdomain":"mine"}"#).unwrap();
    let done = import(data, &frpc, Some(24567)).unwrap().unwrap();
    assert!(!done.secret && !done.frp_server, "{done:?}");
    let identity = Identity::load_or_create(data, None).unwrap();
    assert_eq!((identity.agent_id.to_string().as_str(), identity.agent_port), (GO_ID, 24567));
    assert_eq!(identity.secret().unwrap().expose(), "sk-mine");
    assert_eq!(identity.frp().subdomain.as_deref(), Some("mine"));
}

#[test]
fn without_go_files_nothing_is_written_and_a_bad_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let frpc = dir.path().join("frpc.toml");
    assert_eq!(import(dir.path(), &frpc, None).unwrap(), None);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // An frpc config that is not TOML gives no FRP server; the rest is taken over.
    let (dir, frpc) = go_layout();
    std::fs::write(&frpc, "serverAddr = ").unwrap();
    let done = import(dir.path(), &frpc, None).unwrap().unwrap();
    assert!(done.secret && !done.frp_server, "{done:?}");

    let (dir, frpc) = go_layout();
    std::fs::write(dir.path().join("agent_id"), "not-a-uuid\n").unwrap();
    let err = import(dir.path(), &frpc, None).unwrap_err();
    assert!(err.to_string().contains("not a UUID"), "{err}");
    assert!(!dir.path().join(IDENTITY_FILE).exists() && !dir.path().join(SECRET_FILE).exists());
}
