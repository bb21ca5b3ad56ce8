//! The main file on disk: written only when its text changes (a change means an frpc restart),
//! keeping the admin credentials a running frpc already listens with.

use std::net::{Ipv4Addr, TcpListener};

use rand::Rng;

use super::TunnelError;
use super::config::{self, ClientConfig, FrpCredentials, WebServerConfig};
use super::publish::TunnelSettings;
use crate::fsutil;
use crate::secret::Secret;

/// A fresh admin endpoint: a loopback port free right now, user `qudata`, a random password.
pub fn random_admin() -> WebServerConfig {
    // The port is free now; frpc binds it a moment later, on loopback only.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(7400);
    let password: String =
        rand::rng().sample_iter(rand::distr::Alphanumeric).take(32).map(char::from).collect();
    WebServerConfig {
        addr: "127.0.0.1".into(),
        port,
        user: "qudata".into(),
        password: Secret::new(password),
    }
}

/// Renders and writes the main file when its text differs; `admin: None` keeps the admin
/// credentials of the file on disk, since a running frpc listens with them.
pub fn write(
    s: &TunnelSettings,
    creds: &FrpCredentials,
    admin: Option<WebServerConfig>,
) -> Result<(ClientConfig, bool), TunnelError> {
    let path = &s.config_path;
    fsutil::ensure_private_dir(&config::include_dir(path))?;
    let old = fsutil::read_optional(path)?;
    let on_disk = || {
        let text = String::from_utf8_lossy(old.as_deref()?).into_owned();
        toml::from_str::<ClientConfig>(&text).ok().map(|m| m.web_server)
    };
    let admin = admin.or_else(on_disk).unwrap_or_else(random_admin);
    let main = config::main_config(creds, &admin, path, &s.agent_id, s.agent_port);
    let text = config::render(&main)?;
    let changed = old.as_deref() != Some(text.as_bytes());
    if changed {
        fsutil::write_atomic(path, text.as_bytes())?;
    }
    Ok((main, changed))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::tunnel::Backoff;

    #[test]
    fn rewrites_only_on_change_and_keeps_the_admin_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TunnelSettings {
            frpc_binary: "frpc".into(),
            config_path: dir.path().join("etc/frpc.toml"),
            run_dir: dir.path().join("run"),
            agent_id: "a1".into(),
            agent_port: 8123,
            backoff: Backoff::PRODUCTION,
            ready_timeout: Duration::from_secs(1),
        };
        let mut creds = FrpCredentials {
            server_addr: "frp.example.net".into(),
            server_port: 7000,
            token: Secret::new("t1"),
            subdomain: "h1".into(),
        };
        let (first, changed) = write(&settings, &creds, None).unwrap();
        assert!(changed);
        let mode = std::fs::metadata(&settings.config_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, changed) = write(&settings, &creds, None).unwrap();
        assert!(!changed, "same credentials, same file");
        assert_eq!(again.web_server, first.web_server);
        creds.token = Secret::new("t2");
        let (rotated, changed) = write(&settings, &creds, None).unwrap();
        assert!(changed);
        assert_eq!(rotated.web_server, first.web_server, "a running frpc keeps its admin API");
        assert_eq!(rotated.web_server.password.expose().len(), 32);
    }
}
