//! The control plane's answer envelope, **compat**: `{"ok": bool, "data": …, "error"?: str}`.

use serde::Deserialize;
use serde_json::Value;

use super::error::ClientError;

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    error: Option<String>,
}

/// The `data` of a successful answer (`Null` when absent); an error for a non-2xx status or
/// `ok:false`, carrying the status and the server's `error` text.
pub fn open(path: &'static str, status: u16, body: &[u8]) -> Result<Value, ClientError> {
    let parsed: Result<Envelope, _> = serde_json::from_slice(body);
    let success = (200..300).contains(&status);
    match parsed {
        Ok(env) if success && env.ok => Ok(env.data),
        Ok(env) => Err(ClientError::Refused {
            path,
            status,
            message: one_line(env.error.as_deref().unwrap_or("no error text")),
        }),
        Err(_) if !success => {
            Err(ClientError::Refused { path, status, message: "no JSON error text".into() })
        }
        Err(e) => Err(ClientError::Malformed { path, detail: format!("not the envelope: {e}") }),
    }
}

/// A server's error text, bounded and on one line, for a log line.
fn one_line(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    flat.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_gives_data() {
        assert_eq!(open("/init", 200, br#"{"ok":true,"data":{"a":1}}"#).unwrap()["a"], 1);
        assert_eq!(open("/stats", 201, br#"{"ok":true}"#).unwrap(), Value::Null);
        assert_eq!(open("/ping", 200, br#"{"ok":true,"data":null}"#).unwrap(), Value::Null);
    }

    #[test]
    fn ok_false_is_an_error_with_status_and_text() {
        let e = open("/init", 200, br#"{"ok":false,"error":"bad key"}"#).unwrap_err();
        assert!(matches!(e, ClientError::Refused { status: 200, .. }));
        assert_eq!(e.to_string(), "the control plane answered /init with 200: bad key");
        assert!(!e.is_transient());
    }

    #[test]
    fn non_2xx_is_an_error_even_with_ok_true() {
        let e = open("/stats", 503, br#"{"ok":true}"#).unwrap_err();
        assert!(matches!(e, ClientError::Refused { status: 503, .. }));
        assert!(e.is_transient());
        let e = open("/stats", 429, b"slow down").unwrap_err();
        assert_eq!(e.to_string(), "the control plane answered /stats with 429: no JSON error text");
        assert!(e.is_transient());
        let e = open("/init", 401, br#"{"ok":false,"error":"invalid\napi key"}"#).unwrap_err();
        assert_eq!(e.to_string(), "the control plane answered /init with 401: invalid api key");
        assert!(!e.is_transient());
    }

    #[test]
    fn a_2xx_that_is_not_the_envelope_is_malformed() {
        for body in [&b"<html>"[..], b"{}", br#"{"data":{}}"#, b""] {
            let e = open("/init", 200, body).unwrap_err();
            assert!(matches!(e, ClientError::Malformed { .. }), "{body:?}: {e}");
        }
    }
}
