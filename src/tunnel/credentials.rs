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

/// The environment wins over `/init`, field by field (PROTOCOL.md §1).
pub fn resolve_credentials(
    env: &FrpOverrides,
    init: Option<&FrpCredentials>,
) -> Result<FrpCredentials, MissingCredentials> {
    let server = env.server.clone().or_else(|| init.map(|i| i.server_addr.clone()));
    let port = env.port.or_else(|| init.map(|i| i.server_port));
    let token = env.token.clone().or_else(|| init.map(|i| i.token.clone()));
    let subdomain = env.subdomain.clone().or_else(|| init.map(|i| i.subdomain.clone()));
    let nonempty = |s: &Option<String>| s.as_deref().is_some_and(|v| !v.is_empty());
    let missing: Vec<&str> = [
        ("server", nonempty(&server)),
        ("port", port.is_some_and(|p| p != 0)),
        ("token", token.as_ref().is_some_and(|t| !t.is_empty())),
        ("subdomain", nonempty(&subdomain)),
    ]
    .into_iter()
    .filter_map(|(name, ok)| (!ok).then_some(name))
    .collect();
    match (server, port, token, subdomain) {
        (Some(server_addr), Some(server_port), Some(token), Some(subdomain))
            if missing.is_empty() =>
        {
            Ok(FrpCredentials { server_addr, server_port, token, subdomain })
        }
        _ => Err(MissingCredentials { missing: missing.join(", ") }),
    }
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
