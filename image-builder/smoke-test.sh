#!/usr/bin/env bash
# Boots the CI guest the way the agent will: q35 + OVMF under TCG, a qcow2 overlay on the
# built image, a NoCloud seed with a fresh key, user networking with a forwarded SSH port.
# Checks SSH login, the seeded hostname, and a clean ACPI power-off through QMP.
# Usage: smoke-test.sh [OUT_DIR]   (the image is built there first, or reused when current)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out_dir=${1:-$here/out}
ssh_deadline=${QUDATA_SMOKE_SSH_DEADLINE:-180}
off_deadline=${QUDATA_SMOKE_POWEROFF_DEADLINE:-60}
ovmf_code=${QUDATA_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
ovmf_vars=${QUDATA_OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}

say() { printf '[smoke] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; [ -f "${tmp:-}/serial.log" ] && { say "serial log:"; tail -n 40 "$tmp/serial.log" >&2; }; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for t in qemu-system-x86_64 qemu-img ssh ssh-keygen mkfs.vfat mcopy python3; do
  command -v "$t" >/dev/null || fail "$t is missing; install the packages in tests/packages.txt"
done

t0=$(now)
image=$("$here/build-ci-guest.sh" "$out_dir" | tail -n 1)
say "image ready after $(since "$t0") s: $image"

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

host="smoke-$$"
ssh-keygen -q -t ed25519 -N '' -C smoke -f "$tmp/id"
# Quoted the way the agent writes its seed (JSON strings are YAML double-quoted scalars).
cat >"$tmp/meta-data" <<META
instance-id: "smoke-$$"
local-hostname: "$host"
META
cat >"$tmp/user-data" <<USER
#cloud-config
hostname: "$host"
ssh_authorized_keys:
  - "$(cat "$tmp/id.pub")"
USER
mkfs.vfat -n CIDATA -C "$tmp/seed.img" 1024 >/dev/null
mcopy -i "$tmp/seed.img" "$tmp/meta-data" "$tmp/user-data" ::

qemu-img create -q -f qcow2 -b "$image" -F qcow2 "$tmp/disk.qcow2"
cp "$ovmf_vars" "$tmp/vars.fd"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

t_qemu=$(now)
# virtio-rng seeds the guest kernel's pool at once; without it dropbearkey waits about 1.5 s
# under TCG for the pool to fill.
qemu-system-x86_64 -machine q35 -accel tcg -m 512 -smp 1 -nodefaults -no-user-config \
  -display none \
  -drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code" \
  -drive "if=pflash,format=raw,unit=1,file=$tmp/vars.fd" \
  -drive "if=virtio,format=qcow2,file=$tmp/disk.qcow2" \
  -drive "if=virtio,format=raw,readonly=on,file=$tmp/seed.img" \
  -device virtio-rng-pci \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0 \
  -serial "file:$tmp/serial.log" \
  -qmp "unix:$tmp/qmp.sock,server=on,wait=off" &
qemu_pid=$!

ssh_opts=(-i "$tmp/id" -p "$port" -o BatchMode=yes -o ConnectTimeout=5
  -o StrictHostKeyChecking=accept-new -o "UserKnownHostsFile=$tmp/known_hosts" -o LogLevel=ERROR)
wait_ssh() { # wait_ssh SINCE: until a login works, QEMU dies, or the deadline passes
  until ssh "${ssh_opts[@]}" root@127.0.0.1 true </dev/null 2>/dev/null; do
    kill -0 "$qemu_pid" 2>/dev/null || fail "QEMU exited before SSH came up"
    [ "$(since "$1" | cut -d. -f1)" -lt "$ssh_deadline" ] || fail "no SSH within $ssh_deadline s"
    sleep 1
  done
}
# qmp CMD...: runs QMP commands in order; fails on an error reply.
qmp() {
  python3 - "$tmp/qmp.sock" "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())  # greeting
for cmd in ["qmp_capabilities"] + sys.argv[2:]:
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:
        msg = json.loads(f.readline())
        if "event" in msg:
            continue
        if "return" not in msg:
            sys.exit(f"{cmd}: {msg}")
        break
PY
}
wait_ssh "$t_qemu"
say "SSH up $(since "$t_qemu") s after QEMU start"

got=$(ssh "${ssh_opts[@]}" root@127.0.0.1 hostname </dev/null)
[ "$got" = "$host" ] || fail "guest hostname is '$got', seed says '$host'"
got=$(ssh "${ssh_opts[@]}" root@127.0.0.1 echo ok </dev/null)
[ "$got" = ok ] || fail "'echo ok' over SSH printed '$got'"
# The agent uploads files as `cat > file` fed by stdin and runs `sh -c`.
printf 'uploaded\n' | ssh "${ssh_opts[@]}" root@127.0.0.1 'cat > /tmp/upload && chmod 0600 /tmp/upload'
got=$(ssh "${ssh_opts[@]}" root@127.0.0.1 sh -c "'cat /tmp/upload; setsid true; ps >/dev/null; command -v nohup kill mkdir >/dev/null && echo tools'" </dev/null)
[ "$got" = "uploaded"$'\n'"tools" ] || fail "upload/tool check printed '$got'"
# PID 1 must reap orphans: leave one behind, then look for zombies.
ssh "${ssh_opts[@]}" root@127.0.0.1 'sh -c "sleep 0.3 & exit 0"' </dev/null
sleep 2
got=$(ssh "${ssh_opts[@]}" root@127.0.0.1 "cat /proc/[0-9]*/stat 2>/dev/null | awk '\$3 == \"Z\"' | wc -l" </dev/null)
[ "$got" = 0 ] || fail "$got zombie process(es) in the guest"
say "hostname, echo, upload, tools and reaping OK"

# A reset (the agent's restart) must keep the host key the client pinned on first contact.
t_reset=$(now)
qmp system_reset || fail "QMP system_reset failed"
ssh_opts+=(-o StrictHostKeyChecking=yes)
sleep 1
wait_ssh "$t_reset"
got=$(ssh "${ssh_opts[@]}" root@127.0.0.1 hostname </dev/null)
[ "$got" = "$host" ] || fail "after the reset the hostname is '$got'"
[ "$(grep -c '^ci-guest: up' "$tmp/serial.log")" = 2 ] || fail "the guest did not boot twice"
say "SSH up again $(since "$t_reset") s after system_reset, same host key"

t_off=$(now)
qmp system_powerdown || fail "QMP system_powerdown failed"
while kill -0 "$qemu_pid" 2>/dev/null; do
  [ "$(since "$t_off" | cut -d. -f1)" -lt "$off_deadline" ] || fail "guest did not power off within $off_deadline s"
  sleep 0.2
done
wait "$qemu_pid" || fail "QEMU exited with status $?"
qemu_pid=
grep -q "ci-guest: powering off" "$tmp/serial.log" || fail "guest did not run its shutdown action"
say "powered off $(since "$t_off") s after system_powerdown"
say "PASS"
