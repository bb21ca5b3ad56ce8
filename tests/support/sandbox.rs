//! The file-system and privilege sandbox of `systemd/qudata-agent.service`, reproduced with a
//! mount namespace because systemd cannot run as PID 1 here. Covers ProtectSystem=strict with
//! one writable directory (standing in for StateDirectory=, RuntimeDirectory= and
//! ReadWritePaths=), PrivateTmp=, ProtectHome=, ProtectControlGroups=, ProtectHostname=,
//! PrivateMounts=, UMask=, NoNewPrivileges=, CapabilityBoundingSet= and, where the test runs
//! with CAP_SYS_RESOURCE, LimitMEMLOCK=. Not covered: the seccomp-based options
//! (SystemCallArchitectures=, LockPersonality=, RestrictRealtime=, RestrictSUIDSGID=) and
//! ProtectKernelLogs=.

use std::path::Path;

/// Runs inside `unshare --mount --uts`: $1 is the writable dir, the rest the command.
const SCRIPT: &str = r#"
set -eu
rw=$1; shift
# ProtectSystem=strict: every mount read-only but the API file systems.
findmnt -rn -o TARGET | sort -u | while read -r m; do
  case "$m" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) continue ;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || echo "sandbox: $m stays as it is" >&2
done
mount --bind "$rw" "$rw"
mount -o remount,bind,rw "$rw"
mount -t tmpfs -o mode=1777 tmpfs /tmp                      # PrivateTmp=yes
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
for home in /home /root /run/user; do                       # ProtectHome=yes
  if [ -d "$home" ]; then mount -t tmpfs -o ro,mode=000 tmpfs "$home"; fi
done
mount -o remount,bind,ro /sys/fs/cgroup 2>/dev/null || true  # ProtectControlGroups=yes
umask 0077                                                  # UMask=0077
# LimitMEMLOCK=infinity: raising the hard limit needs CAP_SYS_RESOURCE, which systemd has and
# a test container may not.
prlimit --pid $$ --memlock=unlimited 2>/dev/null ||
  echo "sandbox: memlock stays $(ulimit -l) (no CAP_SYS_RESOURCE here)" >&2
exec setpriv --no-new-privs \
  --bounding-set -sys_boot,-sys_time,-wake_alarm,-sys_pacct,-linux_immutable,-sys_tty_config,-block_suspend,-lease \
  -- "$@"
"#;

/// The wrapper for `Agent::start_via`: the unit's sandbox with `writable` as the one
/// writable directory.
pub fn unit_sandbox(writable: &Path) -> Vec<String> {
    ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", SCRIPT, "sandbox"]
        .iter()
        .map(|s| s.to_string())
        .chain([writable.display().to_string()])
        .collect()
}

/// The options of the mount at `target` as a process sees it (from its mountinfo).
pub fn mount_options(pid: u32, target: &str) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    // Fields: id parent major:minor root target options ... - fstype source super-options.
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields.get(4) == Some(&target))
            .then(|| format!("{} {}", fields[5], fields.get(dash + 1).copied().unwrap_or("")))
    })
}
