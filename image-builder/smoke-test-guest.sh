#!/usr/bin/env bash
# Boots the production guest the way the agent will (q35 + OVMF under TCG, a qcow2 overlay
# bigger than the image, the agent's NoCloud seed) and checks what a renter gets: SSH as root
# and as renter with the seeded key, the hostname, cloud-init done without errors, the root
# filesystem grown to the disk, sudo, JupyterLab, the host key on the serial console equal to
# the one sshd offers, no failed unit, qemu-guest-agent answering, and an ACPI power-off.
# Usage: smoke-test-guest.sh [IMAGE]   (default: build-guest.sh --no-nvidia, reused when current)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ssh_deadline=${QUDATA_SMOKE_SSH_DEADLINE:-900}
off_deadline=${QUDATA_SMOKE_POWEROFF_DEADLINE:-120}
ovmf_code=${QUDATA_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
ovmf_vars=${QUDATA_OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
disk_gib=20

say() { printf '[smoke-guest] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; [ -f "${tmp:-}/serial.log" ] && { say "serial log:"; tail -n 60 "$tmp/serial.log" >&2; }; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for t in qemu-system-x86_64 qemu-img ssh ssh-keygen ssh-keyscan mkfs.vfat mcopy python3; do
  command -v "$t" >/dev/null || fail "$t is missing; install the packages in tests/packages.txt"
done

if [ $# -ge 1 ]; then
  image=$1
else
  image=$("$here/build-guest.sh" --no-nvidia | tail -n 1)
fi
[ -f "$image" ] || fail "no image at $image"
say "image: $image"

tmp=$(mktemp -d)
qemu_pid=
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

host="qudata-test-1"
ssh-keygen -q -t ed25519 -N '' -C smoke -f "$tmp/id"
# The seed the agent writes (JSON strings are YAML double-quoted scalars).
cat >"$tmp/meta-data" <<META
instance-id: "test-1"
local-hostname: "$host"
META
cat >"$tmp/user-data" <<USER
#cloud-config
hostname: "$host"
manage_etc_hosts: true
disable_root: false
ssh_pwauth: false
package_update: false
package_upgrade: false
ssh_authorized_keys:
  - "$(cat "$tmp/id.pub")"
USER
mkfs.vfat -n CIDATA -C "$tmp/seed.img" 1024 >/dev/null
mcopy -i "$tmp/seed.img" "$tmp/meta-data" "$tmp/user-data" ::

qemu-img create -q -f qcow2 -b "$image" -F qcow2 "$tmp/disk.qcow2" "${disk_gib}G"
cp "$ovmf_vars" "$tmp/vars.fd"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

t_qemu=$(now)
# The agent's devices, plus a guest-agent channel to see qemu-guest-agent answer.
qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 2048 -smp 2 -nodefaults -no-user-config \
  -display none \
  -drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code" \
  -drive "if=pflash,format=raw,unit=1,file=$tmp/vars.fd" \
  -drive "if=virtio,format=qcow2,file=$tmp/disk.qcow2" \
  -drive "if=virtio,format=raw,readonly=on,file=$tmp/seed.img" \
  -device virtio-rng-pci \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0 \
  -device virtio-serial-pci \
  -chardev "socket,id=qga0,path=$tmp/qga.sock,server=on,wait=off" \
  -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
  -serial "file:$tmp/serial.log" \
  -qmp "unix:$tmp/qmp.sock,server=on,wait=off" &
qemu_pid=$!

ssh_opts=(-i "$tmp/id" -p "$port" -o BatchMode=yes -o ConnectTimeout=10
  -o StrictHostKeyChecking=accept-new -o "UserKnownHostsFile=$tmp/known_hosts" -o LogLevel=ERROR)
# The commands are this script's constants, run by the guest's shell.
# shellcheck disable=SC2029
as() { local user=$1; shift; ssh "${ssh_opts[@]}" "$user@127.0.0.1" "$@" </dev/null; }
until as root true 2>/dev/null; do
  kill -0 "$qemu_pid" 2>/dev/null || fail "QEMU exited before SSH came up"
  [ "$(since "$t_qemu" | cut -d. -f1)" -lt "$ssh_deadline" ] || fail "no SSH within $ssh_deadline s"
  sleep 2
done
say "SSH (root) up $(since "$t_qemu") s after QEMU start"

got=$(as root hostname)
[ "$got" = "$host" ] || fail "hostname is '$got', the seed says '$host'"
# cloud-init may still run its final stage when sshd answers.
status=$(as root timeout 600 cloud-init status --wait --long) || fail "cloud-init status: $status"
grep -q '^status: done' <<<"$status" || fail "cloud-init: $status"
if as root cloud-init status --format json | python3 -c '
import json, sys
s = json.load(sys.stdin)
bad = s.get("errors") or s.get("recoverable_errors")
sys.exit(1 if bad else 0)'; then :; else fail "cloud-init reported errors: $(as root cloud-init status --long)"; fi
say "cloud-init: done, no errors ($(since "$t_qemu") s)"

got=$(as renter 'sudo -n true && whoami && sudo -n whoami')
[ "$got" = "renter"$'\n'"root" ] || fail "renter: sudo -n printed '$got'"
size_kib=$(as root df --output=size -k / | tail -n 1 | tr -d ' ')
[ "$size_kib" -gt $(((disk_gib - 1) * 1024 * 1024)) ] || fail "root fs did not grow: $size_kib KiB"
say "root fs: $((size_kib / 1024 / 1024)) GiB; renter has sudo"
got=$(as renter jupyter lab --version) || fail "jupyter lab --version failed: $got"
say "jupyter lab $got"

# The host key cloud-init printed on the console is the one sshd offers.
console_key=$(tr -d '\r' <"$tmp/serial.log" |
  sed -n '/-----BEGIN SSH HOST KEY KEYS-----/,/-----END SSH HOST KEY KEYS-----/p' |
  awk '$1 == "ssh-ed25519" {print $2; exit}')
[ -n "$console_key" ] || fail "no ed25519 key in the serial console's SSH HOST KEY KEYS block"
offered=$(ssh-keyscan -t ed25519 -p "$port" 127.0.0.1 2>/dev/null | awk '{print $3; exit}')
[ "$console_key" = "$offered" ] || fail "console shows $console_key, sshd offers $offered"
say "host key on the console = host key offered"

running=$(as root systemctl is-system-running --wait) || true
failed=$(as root systemctl --failed --no-legend --plain)
[ "$running" = running ] || fail "systemctl is-system-running: $running; failed units: $failed"
say "systemctl is-system-running: $running"
as root systemctl is-active --quiet qemu-guest-agent || fail "qemu-guest-agent is not active"
python3 - "$tmp/qga.sock" <<'PY' || fail "qemu-guest-agent did not answer guest-ping"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])
s.sendall(b'{"execute":"guest-ping"}\n')
reply = json.loads(s.makefile().readline())
sys.exit(0 if reply == {"return": {}} else f"guest-ping: {reply}")
PY
say "qemu-guest-agent answers"

t_off=$(now)
python3 - "$tmp/qmp.sock" <<'PY' || fail "QMP system_powerdown failed"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
f = s.makefile("rw"); json.loads(f.readline())
for cmd in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while "event" in (msg := json.loads(f.readline())): pass
    if "return" not in msg: sys.exit(f"{cmd}: {msg}")
PY
while kill -0 "$qemu_pid" 2>/dev/null; do
  [ "$(since "$t_off" | cut -d. -f1)" -lt "$off_deadline" ] || fail "no power-off within $off_deadline s"
  sleep 0.5
done
wait "$qemu_pid" || fail "QEMU exited with status $?"
qemu_pid=
say "powered off $(since "$t_off") s after system_powerdown"
say "PASS"
