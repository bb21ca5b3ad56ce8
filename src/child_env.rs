//! The environment of every program the agent starts. Never the agent's own: it holds
//! `QUDATA_API_KEY` and systemd's `NOTIFY_SOCKET`, and QEMU and frpc outlive the agent with
//! whatever they were given, readable in `/proc/<pid>/environ`.

use std::ffi::{OsStr, OsString};

/// What every program may see: where to find programs, and locale and time zone for its
/// messages.
const PASSED: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];

/// The variables of `agent_env` a child gets: [`PASSED`] and `also`.
pub fn passed<I>(agent_env: I, also: &[&str]) -> Vec<(OsString, OsString)>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let keep = |k: &OsStr| PASSED.iter().chain(also).any(|name| k == OsStr::new(name));
    agent_env.into_iter().filter(|(k, _)| keep(k)).collect()
}

/// The environment of a child that needs nothing beyond [`PASSED`]; use with `env_clear()`.
pub fn for_child() -> Vec<(OsString, OsString)> {
    passed(std::env::vars_os(), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_passed_variables_reach_a_child() {
        let env = [
            ("PATH", "/usr/bin"),
            ("QUDATA_API_KEY", "ak-secret"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("TZ", "UTC"),
            ("http_proxy", "http://proxy:3128"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let names = |kept: Vec<(OsString, OsString)>| -> Vec<String> {
            kept.into_iter().map(|(k, _)| k.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(names(passed(env.clone(), &[])), ["PATH", "TZ"]);
        assert_eq!(names(passed(env, &["http_proxy"])), ["PATH", "TZ", "http_proxy"]);
    }
}
