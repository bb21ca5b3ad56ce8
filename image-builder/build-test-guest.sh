#!/usr/bin/env bash
# Builds guests that fail to boot on purpose, for the agent's boot-failure tests: the CI
# guest's kernel (same UKI, ESP and GPT layout) with a one-file initramfs whose /init
#   panic   loads pvpanic (so QEMU sees the panic too) and exits: the kernel panics;
#   silent  prints a line and sleeps forever: a guest that boots but never answers SSH;
#   no-esp  (no kernel at all) a GPT disk whose only partition is a Linux one: nothing for
#           UEFI to boot.
# Usage: build-test-guest.sh KIND [OUT_DIR]   (default: image-builder/out)
# Prints the qcow2 path (OUT_DIR/<KIND>-guest.qcow2) as the last line of stdout. Cached by a
# stamp like the CI guest; shares its package cache.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

kind=${1:-}
out_dir=${2:-$here/out}
case $kind in panic|silent|no-esp) ;; *) die "usage: build-test-guest.sh panic|silent|no-esp [OUT_DIR]" ;; esac
cache=${QUDATA_IMAGE_CACHE:-$here/.cache}
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
require_tools apt-get apt-cache dpkg-deb objdump objcopy cpio gzip mkfs.vfat mmd mcopy sfdisk \
  qemu-img flock
mkdir -p "$out_dir" "$cache"
exec 9>"$out_dir/.test-guest-$kind.lock"
flock 9

qcow2="$out_dir/$kind-guest.qcow2"
stamp="$out_dir/$kind-guest.stamp"
stamp_text="scripts=$(cd "$here" && files_digest lib.sh build-test-guest.sh)"$'\n'
work=$(mktemp -d "$out_dir/.build-$kind.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ "$kind" = no-esp ]; then
  if [ -s "$qcow2" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$(printf '%s' "$stamp_text")" ]; then
    printf '%s\n' "$qcow2"; exit 0
  fi
  truncate -s 64M "$work/disk.raw"
  sfdisk --quiet --no-reread --no-tell-kernel "$work/disk.raw" >/dev/null <<SFDISK
label: gpt
label-id: 6A1C5C5E-0C1D-4C9E-9D55-7E51A7E5C0DF
first-lba: 2048
type=$GPT_TYPE_LINUX, uuid=$GPT_UUID_DATA, name="no-esp"
SFDISK
  qemu-img convert -q -O qcow2 "$work/disk.raw" "$work/out.qcow2"
  mv "$work/out.qcow2" "$qcow2"
  printf '%s' "$stamp_text" >"$stamp"
  log "built $qcow2"
  printf '%s\n' "$qcow2"
  exit 0
fi

[ -r "$stub" ] || die "$stub is missing; install systemd-boot-efi"
kernel_pkg=$(deb_meta_target linux-image-cloud-amd64 linux-image-)
pkgs=("$kernel_pkg" busybox-static)
declare -A ver=()
stamp_text+="stub=$(sha256sum "$stub" | cut -d' ' -f1)"$'\n'
while read -r p v; do
  ver[$p]=$v
  stamp_text+="$p=$v"$'\n'
done < <(deb_candidates "${pkgs[@]}")
if [ -s "$qcow2" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$(printf '%s' "$stamp_text")" ]; then
  log "up to date: $qcow2"
  printf '%s\n' "$qcow2"
  exit 0
fi

sysroot="$work/sysroot" rootfs="$work/rootfs"
for p in "${pkgs[@]}"; do
  deb_unpack "$(deb_fetch "$cache" "$p" "${ver[$p]}")" "$sysroot"
done
kver=$(ls "$sysroot/lib/modules")
vmlinuz="$sysroot/boot/vmlinuz-$kver"
SOURCE_DATE_EPOCH=$(stat -c %Y "$vmlinuz")
export SOURCE_DATE_EPOCH

mkdir -p "$rootfs/bin" "$rootfs/lib"
cp "$sysroot/bin/busybox" "$rootfs/bin/busybox"
for applet in sh echo sleep insmod; do ln -s busybox "$rootfs/bin/$applet"; done
case $kind in
  panic)
    cp "$sysroot/lib/modules/$kver/kernel/drivers/misc/pvpanic/"{pvpanic,pvpanic-mmio}.ko "$rootfs/lib/"
    printf '%s\n' '#!/bin/sh' 'echo "panic-guest: init exits now"' \
      'insmod /lib/pvpanic.ko' 'insmod /lib/pvpanic-mmio.ko' 'exit 1' >"$rootfs/init"
    ;;
  silent)
    printf '%s\n' '#!/bin/sh' 'echo "silent-guest: up, and no SSH server will ever start"' \
      'while :; do sleep 3600; done' >"$rootfs/init"
    ;;
esac
chmod 755 "$rootfs/init"
initramfs_pack "$rootfs" "$work/initrd.gz"
printf '%s\n' "console=ttyS0 panic=0" >"$work/cmdline"
printf '%s\n' "ID=qudata-$kind-guest" >"$work/os-release"
uki_build "$stub" "$vmlinuz" "$work/initrd.gz" "$work/cmdline" "$work/os-release" "$work/BOOTX64.EFI"
esp_build "$work/esp.img" 64 "$work/BOOTX64.EFI" EFI/BOOT/BOOTX64.EFI
gpt_assemble "$work/disk.raw" 128 "$work/esp.img" "$kind-guest"
qemu-img convert -q -O qcow2 -c "$work/disk.raw" "$work/out.qcow2"
mv "$work/out.qcow2" "$qcow2"
printf '%s' "$stamp_text" >"$stamp"
log "built $qcow2"
printf '%s\n' "$qcow2"
