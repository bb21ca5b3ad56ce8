#!/usr/bin/env bash
# Builds the small CI guest: a GPT disk whose EFI system partition holds one unified kernel
# image (Debian's cloud kernel + a busybox/dropbear initramfs that applies a NoCloud seed).
# Usage: build-ci-guest.sh [OUT_DIR]   (default: image-builder/out)
# Prints the qcow2 path as the last line of stdout. Unprivileged; no mounts; talks only to
# Debian's package registry (through apt-get download), and only for packages not cached.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

out_dir=${1:-$here/out}
cache=${QUDATA_IMAGE_CACHE:-$here/.cache}
kernel_meta=${QUDATA_IMAGE_KERNEL:-linux-image-cloud-amd64}
cmdline=${QUDATA_IMAGE_CMDLINE:-console=ttyS0 panic=0 quiet}
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
disk_mib=1024
esp_mib=64
# virtio for disks, network and the seed; fat/iso9660 for the seed; button+evdev so acpid
# sees the ACPI power button; nls_ascii is vfat's default iocharset in this kernel;
# pvpanic_mmio reports a kernel panic to QEMU (the agent's `-device pvpanic`).
modules=(virtio_pci virtio_blk virtio_net virtio_scsi sd_mod sr_mod virtio_rng vfat
  nls_cp437 nls_iso8859_1 nls_utf8 nls_ascii isofs button evdev pvpanic_mmio)

require_tools apt-get apt-cache dpkg-deb objdump objcopy depmod cpio gzip mkfs.vfat mmd mcopy \
  sfdisk qemu-img sha256sum flock
[ -r "$stub" ] || die "$stub is missing; install systemd-boot-efi"

mkdir -p "$out_dir" "$cache"
exec 9>"$out_dir/.ci-guest.lock"
flock 9

kernel_pkg=$(deb_meta_target "$kernel_meta" linux-image-)
pkgs=("$kernel_pkg" busybox-static dropbear-bin libc6 libcrypt1 zlib1g libtomcrypt1 libtommath1
  libgmp10)
declare -A ver=()
stamp_text="cmdline=$cmdline"$'\n'"stub=$(sha256sum "$stub" | cut -d' ' -f1)"$'\n'
while read -r p v; do
  ver[$p]=$v
  stamp_text+="$p=$v"$'\n'
done < <(deb_candidates "${pkgs[@]}")
mapfile -t guest_files < <(cd "$here" && find ci-guest -type f | LC_ALL=C sort)
stamp_text+="scripts=$(cd "$here" && files_digest lib.sh build-ci-guest.sh "${guest_files[@]}")"$'\n'
stamp_text+="modules=${modules[*]}"$'\n'

qcow2="$out_dir/ci-guest.qcow2"
stamp="$out_dir/ci-guest.stamp"
if [ -s "$qcow2" ] && [ -s "$qcow2.sha256" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$(printf '%s' "$stamp_text")" ]; then
  log "up to date: $qcow2"
  printf '%s\n' "$qcow2"
  exit 0
fi

work=$(mktemp -d "$out_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
sysroot="$work/sysroot" rootfs="$work/rootfs"
for p in "${pkgs[@]}"; do
  deb_unpack "$(deb_fetch "$cache" "$p" "${ver[$p]}")" "$sysroot"
done

kver=$(ls "$sysroot/lib/modules")
[ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one kernel in $kernel_pkg, found: $kver"
vmlinuz="$sysroot/boot/vmlinuz-$kver"
log "kernel $kver"
# Every timestamp in the image (cpio, FAT) is the kernel's, so equal inputs give equal bytes.
SOURCE_DATE_EPOCH=$(stat -c %Y "$vmlinuz")
export SOURCE_DATE_EPOCH

# Root filesystem of the initramfs.
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc/ci-guest,root,dev,proc,sys,tmp,run,var/log}
ln -s ../run "$rootfs/var/run"
cp "$sysroot/bin/busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list-full); do
  [ -e "$rootfs/$applet" ] || ln -s /bin/busybox "$rootfs/$applet"
done
cp "$sysroot/usr/sbin/dropbear" "$rootfs/usr/sbin/"
cp "$sysroot/usr/bin/dropbearkey" "$rootfs/usr/bin/"
while read -r lib; do
  mkdir -p "$rootfs/$(dirname "$lib")"
  cp "$(sysroot_resolve "$sysroot" "$lib")" "$rootfs/$lib"
done < <(elf_needed_closure "$sysroot" "$sysroot/usr/sbin/dropbear" "$sysroot/usr/bin/dropbearkey")
cp -a "$here/ci-guest/." "$rootfs/"

depmod -b "$sysroot" "$kver"
moddir="$sysroot/lib/modules/$kver"
modules_closure "$moddir" "${modules[@]}" >"$rootfs/etc/ci-guest/modules.order"
while read -r m; do
  mkdir -p "$rootfs/lib/modules/$kver/$(dirname "$m")"
  cp "$moddir/$m" "$rootfs/lib/modules/$kver/$m"
done <"$rootfs/etc/ci-guest/modules.order"
log "modules: $(wc -l <"$rootfs/etc/ci-guest/modules.order") (${modules[*]})"

initrd="$work/initrd.gz"
initramfs_pack "$rootfs" "$initrd"

printf '%s\n' "$cmdline" >"$work/cmdline"
cat >"$work/os-release" <<OSREL
ID=qudata-ci-guest
NAME="qudata CI guest"
PRETTY_NAME="qudata CI guest (Debian $kver)"
VERSION_ID=1
OSREL
uki_build "$stub" "$vmlinuz" "$initrd" "$work/cmdline" "$work/os-release" "$work/BOOTX64.EFI"
log "UKI $(( $(stat -c %s "$work/BOOTX64.EFI") / 1024 )) KiB (initramfs $(( $(stat -c %s "$initrd") / 1024 )) KiB)"

esp_build "$work/esp.img" "$esp_mib" "$work/BOOTX64.EFI" EFI/BOOT/BOOTX64.EFI
gpt_assemble "$work/disk.raw" "$disk_mib" "$work/esp.img" ci-guest-state
qemu-img convert -q -O qcow2 -c "$work/disk.raw" "$work/ci-guest.qcow2"
mv "$work/ci-guest.qcow2" "$qcow2"
(cd "$out_dir" && sha256sum ci-guest.qcow2 >ci-guest.qcow2.sha256)
printf '%s' "$stamp_text" >"$stamp"
log "built $qcow2 ($(( $(stat -c %s "$qcow2") / 1024 / 1024 )) MiB)"
printf '%s\n' "$qcow2"
