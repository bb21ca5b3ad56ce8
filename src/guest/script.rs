//! Pure builders for everything the agent sends to a guest: the few command lines it executes
//! (fixed text plus agent-owned, validated paths) and the files it uploads. User values appear
//! only in file contents, each single-quoted by [`sh_quote`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::client::GuestPath;

/// Quotes `value` for a POSIX shell: the result is one word that expands to exactly `value`.
/// Inside single quotes nothing is special except `'`, which becomes `'\''`.
pub fn sh_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// The renter's environment as a file that `sh` sources: one `export NAME='value'` per line.
/// Names must already be valid (`[A-Za-z_][A-Za-z0-9_]*`); an invalid one is returned as `Err`.
pub fn env_file(env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::from("# Written by qudata-agent: the renter's env_variables.\n");
    for (name, value) in env {
        if !crate::instance::spec::is_env_name(name) {
            return Err(name.clone());
        }
        let _ = writeln!(out, "export {name}={}", sh_quote(value));
    }
    Ok(out)
}

/// `authorized_keys` holding the management key first (so a renter key change never locks the
/// agent out) and then exactly the renter's keys, one per line, duplicates dropped.
pub fn authorized_keys_file(management: Option<&str>, renter: &[String]) -> String {
    let mut out = String::new();
    let mut seen: Vec<&str> = Vec::new();
    for line in management.into_iter().chain(renter.iter().map(String::as_str)) {
        if seen.iter().any(|s| super::keys::same_public_key(s, line)) {
            continue;
        }
        seen.push(line);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Writes stdin to `path` whole: a temp file beside it, its mode set, then renamed over.
pub fn upload_command(path: &GuestPath, mode: u32) -> String {
    let tmp = sh_quote(&format!("{}.qudata-tmp", path.as_str()));
    let dst = sh_quote(path.as_str());
    format!("umask 077 && cat > {tmp} && chmod {mode:o} {tmp} && mv -f {tmp} {dst}")
}

/// Creates a private directory (and parents) and makes sure an existing one is private too.
pub fn mkdir_command(dir: &GuestPath) -> String {
    let dir = sh_quote(dir.as_str());
    format!("umask 077 && mkdir -p {dir} && chmod 700 {dir}")
}

/// Runs the uploaded service control script with a fixed verb.
pub fn service_command(run_dir: &GuestPath, verb: ServiceVerb) -> String {
    let script = sh_quote(&format!("{}/{SERVICE_SCRIPT}", run_dir.as_str()));
    format!("sh {script} {}", verb.as_str())
}

/// What the control script is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceVerb {
    /// Keeps a running service whose command and environment are unchanged (an agent that
    /// restarted and adopted the VM must not kill the renter's Jupyter); starts it otherwise.
    Ensure,
    Stop,
    Status,
}

impl ServiceVerb {
    fn as_str(self) -> &'static str {
        match self {
            ServiceVerb::Ensure => "ensure",
            ServiceVerb::Stop => "stop",
            ServiceVerb::Status => "status",
        }
    }
}

/// File names inside the run directory.
pub const RUN_SCRIPT: &str = "renter.sh";
pub const SERVICE_SCRIPT: &str = "service.sh";
pub const ENV_FILE: &str = "renter.env";
pub const COMMAND_FILE: &str = "renter.cmd";
/// Where the agent uploads the command and environment; `ensure` moves them into place.
pub const NEW_ENV_FILE: &str = "renter.env.new";
pub const NEW_COMMAND_FILE: &str = "renter.cmd.new";
pub const PID_FILE: &str = "renter.pid";
pub const LOG_FILE: &str = "renter.log";

/// Runs the renter's command line with the renter's environment. The command is read from a
/// file into `$1` before the environment is sourced, so no variable name can shadow it, and
/// the shell is named by its path, so a renter `PATH` cannot break the start.
pub const RUN_SCRIPT_TEXT: &str = r#"#!/bin/sh
# Written by qudata-agent: the renter's command with the renter's environment.
dir=$(dirname "$0")
set -- "$(cat "$dir/renter.cmd")" "$dir/renter.env"
cd "${HOME:-/root}" 2>/dev/null || cd /
. "$2"
exec /bin/sh -c "$1"
"#;

/// Starts, stops and reports the renter's service without systemd (busybox `sh`, `setsid`).
/// The recorded pid leads its own session, so the whole process group is signalled; a pid that
/// is gone, a zombie, or reused by a process that does not lead its session is not ours.
pub const SERVICE_SCRIPT_TEXT: &str = r#"#!/bin/sh
# Written by qudata-agent: start|stop|status of the renter's command.
dir=$(dirname "$0")
pidfile="$dir/renter.pid"

running() {
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    set -- ${stat##*") "}
    [ "$1" != Z ] && [ "$4" = "$pid" ] && echo "$pid"
}

stop() {
    pid=$(running) || { rm -f "$pidfile"; return 0; }
    kill -TERM "-$pid" 2>/dev/null
    i=0
    while running >/dev/null && [ "$i" -lt 10 ]; do sleep 1; i=$((i + 1)); done
    kill -KILL "-$pid" 2>/dev/null
    rm -f "$pidfile"
}

same() { cmp -s "$dir/renter.cmd.new" "$dir/renter.cmd" && cmp -s "$dir/renter.env.new" "$dir/renter.env"; }

case "$1" in
ensure)
    if pid=$(running) && same; then
        rm -f "$dir/renter.cmd.new" "$dir/renter.env.new"
        echo "$pid"
        exit 0
    fi
    stop
    mv -f "$dir/renter.cmd.new" "$dir/renter.cmd" && mv -f "$dir/renter.env.new" "$dir/renter.env" || exit 1
    umask 077
    setsid sh "$dir/renter.sh" </dev/null >>"$dir/renter.log" 2>&1 &
    echo "$!" >"$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile" && echo "$!"
    ;;
stop) stop ;;
status) running || exit 3 ;;
*) echo "usage: $0 ensure|stop|status" >&2; exit 2 ;;
esac
"#;

/// File names the default user's keys are handed over in (inside the run directory).
pub const USERS_SCRIPT: &str = "users.sh";
pub const RENTER_KEYS_FILE: &str = "renter.keys";
pub const MANAGEMENT_KEY_FILE: &str = "management.pub";

/// Gives the image's default user (cloud-init's `default_user`: `renter`, `debian`,
/// `ubuntu`, …) exactly the renter's keys. cloud-init put the management key into that
/// user's `authorized_keys` at first boot, which is how the home is found; the homes found are
/// remembered on the guest's disk, because the management key leaves that file here. Runs as
/// root with two agent paths as arguments (the homes' parent and the state directory); every
/// other value is read from files in its own directory. Prints the homes it wrote.
pub const USERS_SCRIPT_TEXT: &str = r#"#!/bin/sh
# Written by qudata-agent: the renter's keys for the image's default user.
dir=$(dirname "$0")
homes=$1
state=$2
known="$state/default-homes"
mkdir -p "$state" && chmod 700 "$state" || exit 1
body=$(awk 'NF >= 2 { print $2; exit }' "$dir/management.pub")
[ -n "$body" ] || exit 1
for f in "$homes"/*/.ssh/authorized_keys; do
    [ -f "$f" ] && grep -qF -- "$body" "$f" || continue
    home=${f%/.ssh/authorized_keys}
    grep -qxF -- "$home" "$known" 2>/dev/null || echo "$home" >>"$known"
done
[ -f "$known" ] || exit 0
while read -r home; do
    [ -d "$home" ] || continue
    owner=$(stat -c %u:%g "$home") || continue
    mkdir -p "$home/.ssh" && chown "$owner" "$home/.ssh" && chmod 700 "$home/.ssh" &&
        cp "$dir/renter.keys" "$home/.ssh/authorized_keys.qudata-tmp" &&
        chown "$owner" "$home/.ssh/authorized_keys.qudata-tmp" &&
        chmod 600 "$home/.ssh/authorized_keys.qudata-tmp" &&
        mv -f "$home/.ssh/authorized_keys.qudata-tmp" "$home/.ssh/authorized_keys" &&
        echo "$home"
done <"$known"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_golden() {
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("plain"), "'plain'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$(touch /tmp/x)"), "'$(touch /tmp/x)'");
        assert_eq!(sh_quote("`id`; \"q\" \\n"), "'`id`; \"q\" \\n'");
        assert_eq!(sh_quote("''"), r"''\'''\'''");
        assert_eq!(sh_quote("a\nb"), "'a\nb'");
    }

    #[test]
    fn env_file_golden() {
        let env = BTreeMap::from([
            ("B".to_string(), "x'; touch /tmp/x; '".to_string()),
            ("A_1".to_string(), "$(id) `id` \"$HOME\"".to_string()),
        ]);
        assert_eq!(
            env_file(&env).unwrap(),
            "# Written by qudata-agent: the renter's env_variables.\n\
             export A_1='$(id) `id` \"$HOME\"'\n\
             export B='x'\\''; touch /tmp/x; '\\'''\n"
        );
        let bad = BTreeMap::from([("A=1; id".to_string(), String::new())]);
        assert_eq!(env_file(&bad).unwrap_err(), "A=1; id");
    }

    #[test]
    fn authorized_keys_golden() {
        let renter = vec!["ssh-ed25519 BBBB me".to_string(), "ssh-ed25519 BBBB again".into()];
        assert_eq!(
            authorized_keys_file(Some("ssh-ed25519 AAAA qudata-agent"), &renter),
            "ssh-ed25519 AAAA qudata-agent\nssh-ed25519 BBBB me\n"
        );
        assert_eq!(authorized_keys_file(None, &[]), "");
    }

    #[test]
    fn command_lines_golden() {
        let file = GuestPath::new("/root/.ssh/authorized_keys").unwrap();
        assert_eq!(
            upload_command(&file, 0o600),
            "umask 077 && cat > '/root/.ssh/authorized_keys.qudata-tmp' && chmod 600 \
             '/root/.ssh/authorized_keys.qudata-tmp' && mv -f \
             '/root/.ssh/authorized_keys.qudata-tmp' '/root/.ssh/authorized_keys'"
        );
        let dir = GuestPath::new("/run/qudata").unwrap();
        assert_eq!(
            mkdir_command(&dir),
            "umask 077 && mkdir -p '/run/qudata' && chmod 700 '/run/qudata'"
        );
        assert_eq!(
            service_command(&dir, ServiceVerb::Ensure),
            "sh '/run/qudata/service.sh' ensure"
        );
        assert_eq!(
            service_command(&dir, ServiceVerb::Status),
            "sh '/run/qudata/service.sh' status"
        );
    }
}
