#!/usr/bin/env bash
# Builds the production guest base image: Debian 13 (trixie) with its kernel, systemd,
# cloud-init (NoCloud), sshd, qemu-guest-agent, JupyterLab and (unless --no-nvidia) the NVIDIA
# driver with the open kernel module built by DKMS for the image's kernel. GPT disk: an EFI
# system partition with a standalone GRUB, then an ext4 root that grows to the disk at first
# boot. See README.md ("The production guest").
#
# Usage: build-guest.sh [--out PATH] [--no-nvidia] [--size SIZE]
# Prints the qcow2 path as the last line of stdout. No mounts on the host: mmdebstrap installs
# in a user namespace (--mode=unshare), mkfs.ext4 -d fills the root filesystem from a
# directory, sfdisk and dd assemble the disk in a plain file. Talks only to Debian's archive.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

usage() {
  cat <<'USAGE'
usage: build-guest.sh [--out PATH] [--no-nvidia] [--size SIZE]
  --out PATH    the qcow2 to write (default: image-builder/out/guest.qcow2); PATH.sha256 and
                PATH.manifest are written beside it
  --no-nvidia   without the NVIDIA driver (the CI variant; everything else the same)
  --size SIZE   virtual disk size, e.g. 8G or 6144M (default 8G); the root filesystem grows
                to the VM's disk at first boot
USAGE
}

out=$here/out/guest.qcow2
nvidia=1
size=8G
while [ $# -gt 0 ]; do
  case $1 in
    --out) [ $# -ge 2 ] || die "--out needs a path"; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --no-nvidia) nvidia=0; shift ;;
    --size) [ $# -ge 2 ] || die "--size needs a value"; size=$2; shift 2 ;;
    --size=*) size=${1#--size=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ $size =~ ^([1-9][0-9]*)([MG])$ ]] || die "--size must be a whole number of M or G (e.g. 8G), not '$size'"
disk_mib=${BASH_REMATCH[1]}
[ "${BASH_REMATCH[2]}" = G ] && disk_mib=$((disk_mib * 1024))
case $out in
  */) die "--out names the qcow2 file, not a directory: $out" ;;
  *.qcow2) ;;
  *) die "--out must end in .qcow2: $out" ;;
esac
# Absolute from here on: sfdisk's dump names partitions after the disk's path, and the
# partition lookup reads lines that start with "/".
out=$(realpath -m -- "$out")

cache=${QUDATA_IMAGE_CACHE:-$here/.cache}
mirror=${QUDATA_GUEST_MIRROR:-http://deb.debian.org/debian}
security_mirror=${QUDATA_GUEST_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=trixie
components="main contrib non-free non-free-firmware"
esp_mib=64
# Fixed identifiers: equal inputs lay out equal disks, and GRUB and fstab name the root by
# them. The partition UUID is in the kernel command line (root=PARTUUID=...), lower case:
# initramfs-tools looks it up as /dev/disk/by-partuuid/<uuid>, which udev writes in lower case.
root_partuuid=51a7e500-e5b0-4c1e-9a7a-000000000012
root_fs_uuid=51a7e500-e5b0-4c1e-9a7a-0000000000f5
root_hash_seed=51a7e500-e5b0-4c1e-9a7a-0000000000a5
cmdline="root=PARTUUID=$root_partuuid ro console=tty0 console=ttyS0,115200n8"

# The top-level packages; apt adds their dependencies (no recommends: a lean image, and
# everything below is checked to work without them).
pkgs=(linux-image-amd64 initramfs-tools systemd systemd-sysv systemd-resolved udev dbus
  libpam-systemd cloud-init cloud-guest-utils fdisk e2fsprogs openssh-server qemu-guest-agent
  sudo python3 jupyterlab jupyter-core curl git tmux htop ca-certificates iproute2 procps kmod less
  zstd)
nvidia_pkgs=()
if [ "$nvidia" = 1 ]; then
  # DKMS builds nvidia-open for the image's kernel while the packages install, so the
  # kernel's headers must be there; the GSP firmware is what the open module runs on.
  # Installed by the customize hook, after the rest: a failed module build shows DKMS's log.
  nvidia_pkgs=(linux-headers-amd64 dkms nvidia-open-kernel-dkms nvidia-driver nvidia-smi
    nvidia-persistenced firmware-nvidia-gsp)
fi

require_tools mmdebstrap apt-get apt-cache dpkg-deb tar mkfs.ext4 debugfs mkfs.vfat mcopy mmd sfdisk \
  grub-mkimage qemu-img sha256sum flock
[ -d /usr/lib/grub/x86_64-efi ] || die "/usr/lib/grub/x86_64-efi is missing; install grub-efi-amd64-bin"

out_dir=$(dirname "$out")
name=$(basename "$out")
mkdir -p "$out_dir" "$cache/guest/debs"
exec 9>"$out_dir/.build-guest.lock"
flock 9
# The package cache and apt state are shared by every out dir.
exec 8>"$cache/guest/.lock"
flock 8

# A private apt state for trixie (the host may be another release): what apt would install
# now decides whether the image is current.
apt_dir="$cache/guest/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/empty"
sources=(
  "deb $mirror $suite $components"
  "deb $mirror $suite-updates $components"
  "deb $security_mirror $suite-security $components"
)
printf '%s\n' "${sources[@]}" >"$apt_dir/sources.list"
touch "$apt_dir/status"
APT_OPTS=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/empty"
  -o "Dir::Etc::Parts=$apt_dir/empty" -o "Dir::Etc::PreferencesParts=$apt_dir/empty"
  -o "Dir::Etc::Preferences=$apt_dir/empty/none" -o "Dir::State=$apt_dir"
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
  -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives"
  -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Debug::NoLocking=1)
apt-get "${APT_OPTS[@]}" -qq -o APT::Sandbox::User=root update >&2 ||
  die "apt-get update for $suite failed; check the network"

kernel_pkg=$(deb_meta_target linux-image-amd64 linux-image-)
declare -A ver=()
stamp_text="suite=$suite"$'\n'"nvidia=$nvidia"$'\n'"size=$disk_mib"$'\n'"cmdline=$cmdline"$'\n'
stamp_text+="sources=${sources[*]}"$'\n'
while read -r p v; do
  ver[$p]=$v
  stamp_text+="$p=$v"$'\n'
done < <(deb_candidates "${pkgs[@]}" "${nvidia_pkgs[@]}" "$kernel_pkg")
# The host tools that write the bytes.
stamp_text+="host=$(dpkg-query -W -f '${Package}=${Version} ' mmdebstrap e2fsprogs grub-efi-amd64-bin \
  dosfstools mtools fdisk qemu-utils 2>/dev/null)"$'\n'
mapfile -t guest_files < <(cd "$here" && find guest -type f | LC_ALL=C sort)
stamp_text+="scripts=$(cd "$here" && files_digest lib.sh build-guest.sh guest-customize.sh "${guest_files[@]}")"$'\n'

stamp="$out.stamp"
if [ -s "$out" ] && [ -s "$out.sha256" ] && [ -s "$out.manifest" ] &&
  [ "$(cat "$stamp" 2>/dev/null)" = "$(printf '%s' "$stamp_text")" ]; then
  log "up to date: $out"
  printf '%s\n' "$out"
  exit 0
fi

t_start=$SECONDS
work=$(mktemp -d "$out_dir/.build-guest.XXXXXX")
# Without root the extracted tree belongs to subordinate ids: remove it from the namespace.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else mmdebstrap --unshare-helper "$@"; fi; }
trap 'as_root rm -rf "$work"' EXIT

# Every timestamp defaults to the kernel's build time (the mtime of vmlinuz in its package),
# so equal inputs give an equal image. The kernel package is fetched into the cache, which
# mmdebstrap reads, so it is downloaded once.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  kdeb=$(deb_fetch "$cache/guest" "$kernel_pkg" "${ver[$kernel_pkg]}")
  SOURCE_DATE_EPOCH=$(dpkg-deb --fsys-tarfile "$kdeb" |
    TZ=UTC tar -tv --full-time --wildcards './boot/vmlinuz-*' | awk '{print $4 "T" $5 "Z"}' |
    head -n 1 | xargs -I{} date -u -d {} +%s)
fi
[[ $SOURCE_DATE_EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH is not a number"
export SOURCE_DATE_EPOCH
log "building $out: Debian $suite, nvidia=$nvidia, ${disk_mib} MiB, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"

# The hooks read their inputs from the environment (nothing spliced into their shell strings).
# guest/ goes in as root's 0644 files whatever the checkout's umask was.
export GUEST_ROOT_PARTUUID=$root_partuuid GUEST_NVIDIA=$nvidia GUEST_INFO="$work/info"
export GUEST_DEBS="$cache/guest/debs" GUEST_TREE="$here/guest" GUEST_CUSTOMIZE="$here/guest-customize.sh"
export GUEST_NVIDIA_PKGS="${nvidia_pkgs[*]}"
include=$(IFS=,; printf '%s' "${pkgs[*]}")
# shellcheck disable=SC2016 # the hooks' own shell expands $1 and the GUEST_* variables
# --skip=cleanup/apt: run as root in unshare mode, mmdebstrap 1.3.5's cleanup ran its
# `apt-get update` (empty sources) against the host's own lists and emptied them; the lists
# and caches of the image are removed below instead.
mmdebstrap --mode=unshare --variant=minbase --format=tar --architectures=amd64 \
  --skip=cleanup/apt \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --include="$include" \
  --setup-hook='mkdir -p "$1/var/cache/apt/archives" && cp -a "$GUEST_DEBS/." "$1/var/cache/apt/archives/"' \
  --essential-hook='cd "$GUEST_TREE" && find . -type f -exec install -D -m 0644 {} "$1/{}" ";"' \
  --customize-hook='"$GUEST_CUSTOMIZE" "$1"' \
  "$suite" "$work/root.tar" "${sources[@]}" >&2 ||
  die "mmdebstrap failed (see above)"
log "packages installed after $((SECONDS - t_start)) s"

# The tree, owned as in the image. /dev stays empty: devtmpfs fills it at boot.
mkdir "$work/root"
as_root tar -C "$work/root" --numeric-owner -xpf "$work/root.tar" --xattrs --xattrs-include='*' \
  --exclude='./dev/*'
rm -f "$work/root.tar"
# What must not ship, whatever mmdebstrap's cleanup left: apt's lists and caches, logs, temp
# files (directories stay: apt and the services expect them).
as_root find "$work/root/var/lib/apt/lists" "$work/root/var/cache/apt" "$work/root/var/log" \
  "$work/root/tmp" "$work/root/var/tmp" -mindepth 1 ! -type d ! -name lock -delete
as_root rm -rf "$work/root/var/lib/apt/lists/auxfiles"
as_root find "$work/root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# The ESP: one GRUB EFI binary with its modules and this script built in (grub-mkimage's
# embedded config; no memdisk, whose tar would carry the build's clock) that boots the root
# partition's /vmlinuz and /initrd.img links.
cat >"$work/grub.cfg" <<GRUB
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root $root_fs_uuid
linux /vmlinuz $cmdline
initrd /initrd.img
boot
GRUB
grub-mkimage -O x86_64-efi -o "$work/BOOTX64.EFI" -p /boot/grub -c "$work/grub.cfg" \
  part_gpt ext2 search search_fs_uuid linux serial terminal normal gzio echo test boot configfile
pe_clear_timestamp "$work/BOOTX64.EFI"
esp_build "$work/esp.img" "$esp_mib" "$work/BOOTX64.EFI" EFI/BOOT/BOOTX64.EFI

gpt_assemble "$work/disk.raw" "$disk_mib" "$work/esp.img" guest-root "$root_partuuid"
read -r root_start root_sectors < <(gpt_part_range "$work/disk.raw" 2)
used_kib=$(as_root du -sk "$work/root" | cut -f1)
need_kib=$((used_kib * 5 / 4 + 256 * 1024))
[ $((root_sectors / 2)) -ge "$need_kib" ] ||
  die "--size $size is too small: the root filesystem needs about $((need_kib / 1024 + esp_mib + 2)) MiB"
log "root tree $((used_kib / 1024)) MiB, root partition $((root_sectors / 2048)) MiB"
# Fixed UUID, hash seed and time: mkfs.ext4 is otherwise random and takes the clock.
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH as_root mkfs.ext4 -q -F -L guest-root -U "$root_fs_uuid" \
  -E "hash_seed=$root_hash_seed,root_owner=0:0" -d "$work/root" "$work/root.ext4" "$((root_sectors / 2))k" >&2
# mkfs.ext4 -d copies each file's ctime and atime, which are the extraction's (the kernel sets
# them): set both to SOURCE_DATE_EPOCH, by path, in the new filesystem.
as_root find "$work/root" -mindepth 1 -printf '/%P\n' | while IFS= read -r path; do
  case $path in *\"* | *\\*) die "a path debugfs cannot quote: $path" ;; esac
  printf 'sif "%s" ctime @%s\nsif "%s" atime @%s\n' "$path" "$SOURCE_DATE_EPOCH" "$path" "$SOURCE_DATE_EPOCH"
done >"$work/times.debugfs"
printf 'sif / ctime @%s\nsif / atime @%s\n' "$SOURCE_DATE_EPOCH" "$SOURCE_DATE_EPOCH" >>"$work/times.debugfs"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$work/times.debugfs" "$work/root.ext4" \
  >/dev/null 2>"$work/times.err"
! grep -v '^debugfs [0-9]' "$work/times.err" >&2 || die "debugfs could not set the timestamps (above)"
dd if="$work/root.ext4" of="$work/disk.raw" bs=1M oflag=seek_bytes seek=$((root_start * 512)) \
  conv=notrunc,sparse status=none
rm -f "$work/root.ext4"

# zstd: several times faster to write than zlib at a like size (QEMU reads it since 5.1).
qemu-img convert -q -O qcow2 -c -o compression_type=zstd "$work/disk.raw" "$work/$name"
rm -f "$work/disk.raw"

{
  printf '# qudata guest image manifest (image-builder/build-guest.sh); format 1\n'
  printf 'image: %s\n' "$name"
  printf 'distribution: Debian %s (%s)\n' "$suite" "$mirror"
  printf 'flags: --size %s%s\n' "$size" "$([ "$nvidia" = 1 ] || printf ' --no-nvidia')"
  printf 'source-date-epoch: %s\n' "$SOURCE_DATE_EPOCH"
  printf 'kernel-cmdline: %s\n' "$cmdline"
  cat "$work/info"
  printf 'packages:\n'
  LC_ALL=C sort "$work/info.packages"
} >"$work/$name.manifest"
mv "$work/$name.manifest" "$out.manifest"
mv "$work/$name" "$out"
(cd "$out_dir" && sha256sum "$name" >"$name.sha256")
printf '%s' "$stamp_text" >"$stamp"
log "built $out ($(($(stat -c %s "$out") / 1024 / 1024)) MiB) in $((SECONDS - t_start)) s"
printf '%s\n' "$out"
