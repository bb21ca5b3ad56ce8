//! Which FRP server to log in to: the environment wins over `/init`, field by field.

use super::config::FrpCredentials;
use crate::config::FrpOverrides;

/// Why frpc is not running: which credential is missing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "no FRP credentials ({missing} missing from /init and QUDATA_FRP_*): frpc not started, nothing is published"
)]
pub struct MissingCredentials {
    pub missing: String,
}

/// Complete credentials from optional parts (e.g. the control plane's stored and overridden
/// `/init` values), or which parts are missing. Empty strings and port 0 count as missing.
pub fn credentials_from_parts(
    server: Option<String>,
    port: Option<u16>,
    token: Option<crate::secret::Secret>,
    subdomain: Option<String>,
) -> Result<FrpCredentials, MissingCredentials> {
    let server = server.filter(|v| !v.trim().is_empty());
    let port = port.filter(|&p| p != 0);
    let token = token.filter(|t| !t.is_empty());
    let subdomain = subdomain.filter(|v| !v.trim().is_empty());
    let missing: Vec<&str> = [
        ("server", server.is_some()),
        ("port", port.is_some()),
        ("token", token.is_some()),
        ("subdomain", subdomain.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, ok)| (!ok).then_some(name))
    .collect();
    match (server, port, token, subdomain) {
        (Some(server_addr), Some(server_port), Some(token), Some(subdomain)) => {
            Ok(FrpCredentials { server_addr, server_port, token, subdomain })
        }
        _ => Err(MissingCredentials { missing: missing.join(", ") }),
    }
}

/// The environment wins over `/init`, field by field (PROTOCOL.md §1).
pub fn resolve_credentials(
    env: &FrpOverrides,
    init: Option<&FrpCredentials>,
) -> Result<FrpCredentials, MissingCredentials> {
    credentials_from_parts(
        env.server.clone().or_else(|| init.map(|i| i.server_addr.clone())),
        env.port.or_else(|| init.map(|i| i.server_port)),
        env.token.clone().or_else(|| init.map(|i| i.token.clone())),
        env.subdomain.clone().or_else(|| init.map(|i| i.subdomain.clone())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn init() -> FrpCredentials {
        FrpCredentials {
            server_addr: "frp.example.net".into(),
            server_port: 7000,
            token: Secret::new("from-init"),
            subdomain: "host-a1".into(),
        }
    }

    #[test]
    fn environment_wins_field_by_field() {
        let env = FrpOverrides {
            port: Some(7443),
            token: Some(Secret::new("from-env")),
            ..Default::default()
        };
        let c = resolve_credentials(&env, Some(&init())).unwrap();
        assert_eq!((c.server_addr.as_str(), c.server_port), ("frp.example.net", 7443));
        assert_eq!((c.token.expose(), c.subdomain.as_str()), ("from-env", "host-a1"));
    }

    #[test]
    fn missing_fields_are_named_in_one_line() {
        let env = FrpOverrides { server: Some("frp.example.net".into()), ..Default::default() };
        let err = resolve_credentials(&env, None).unwrap_err();
        assert_eq!(err.missing, "port, token, subdomain");
        let line = err.to_string();
        assert!(line.contains("frpc not started") && !line.contains('\n'), "{line}");
        let mut empty_token = init();
        empty_token.token = Secret::new("");
        let err = resolve_credentials(&FrpOverrides::default(), Some(&empty_token)).unwrap_err();
        assert_eq!(err.missing, "token");
    }
}
