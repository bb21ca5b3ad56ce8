# shellcheck shell=bash
# Building blocks shared by the guest-image recipes (the CI guest now, the production base
# image later). Everything here runs unprivileged: no mounts, no loop devices, no chroot.
# Only Debian's package registry is contacted, through apt.

# Partition type GUIDs (UEFI spec / Discoverable Partitions Specification).
readonly GPT_TYPE_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
readonly GPT_TYPE_LINUX=0FC63DAF-8483-4772-8E79-3D69D8477DE4
# Fixed identifiers, so two builds of the same inputs lay out the same disk.
readonly GPT_UUID_ESP=51A7E500-E5B0-4C1E-9A7A-000000000001
readonly GPT_UUID_DATA=51A7E500-E5B0-4C1E-9A7A-000000000002

log() { printf '[image-builder] %s\n' "$*" >&2; }
die() { printf '[image-builder] error: %s\n' "$*" >&2; exit 1; }

require_tools() {
  local t missing=()
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]}; install the packages listed in tests/packages.txt"
}

# Extra options for every apt call the helpers make (build-guest.sh points them at a private
# state directory for another suite); empty: the host's own apt configuration.
APT_OPTS=()

# deb_candidates PKG... -> "PKG VERSION" lines: the versions apt would install now.
# One apt-cache call for all of them (each call costs about a second).
deb_candidates() {
  local out
  out=$(LC_ALL=C apt-cache "${APT_OPTS[@]}" policy "$@" 2>/dev/null |
    awk '/^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
         /^  Candidate:/ && $2 != "(none)" { print pkg, $2 }')
  local p
  for p in "$@"; do
    awk -v p="$p" '$1 == p { found = 1 } END { exit !found }' <<<"$out" || die "package $p has no candidate version; run apt-get update"
  done
  printf '%s\n' "$out"
}

# The concrete package a metapackage (e.g. linux-image-cloud-amd64) depends on, for the
# metapackage's candidate version.
deb_meta_target() {
  local meta=$1 prefix=$2 t
  t=$(LC_ALL=C apt-cache "${APT_OPTS[@]}" depends "$meta" 2>/dev/null |
    awk -v p="$prefix" '$1 == "Depends:" && index($2, p) == 1 {print $2; exit}')
  [ -n "$t" ] || die "cannot resolve $meta to a $prefix* package; run apt-get update"
  printf '%s\n' "$t"
}

# deb_fetch CACHE PKG VERSION -> prints the path of the cached .deb, downloading it once.
# apt-get download checks the file against the signed archive index.
deb_fetch() {
  local cache=$1 pkg=$2 ver=$3 dest tmp
  dest="$cache/debs/${pkg}_${ver//:/%3a}_amd64.deb"
  if [ ! -s "$dest" ]; then
    mkdir -p "$cache/debs"
    tmp=$(mktemp -d "$cache/debs/.dl.XXXXXX")
    log "downloading $pkg $ver"
    (cd "$tmp" && apt-get "${APT_OPTS[@]}" download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null) ||
      { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed; check the network and run apt-get update"; }
    mv "$tmp"/*.deb "$dest"
    rm -rf "$tmp"
  fi
  printf '%s\n' "$dest"
}

# deb_unpack DEB DIR: extract without installing (no maintainer scripts run).
deb_unpack() { mkdir -p "$2" && dpkg-deb -x "$1" "$2"; }

# elf_needed_closure SYSROOT FILE... -> prints sysroot-relative paths of every shared library
# the files need (transitively), plus the ELF interpreter. Reads DT_NEEDED with objdump
# instead of running ldd, so nothing from the sysroot is executed on the build host.
elf_needed_closure() {
  local sysroot=$1; shift
  local -A seen=()
  local queue=("$@") f lib dir found
  local libdirs=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib usr/lib lib64)
  while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for lib in $(objdump -p "$f" | awk '$1 == "NEEDED" {print $2}'); do
      [ -n "${seen[$lib]:-}" ] && continue
      found=
      for dir in "${libdirs[@]}"; do
        if [ -e "$sysroot/$dir/$lib" ]; then found="$dir/$lib"; break; fi
      done
      [ -n "$found" ] || die "shared library $lib (needed by ${f#"$sysroot"/}) is not in the unpacked packages"
      seen[$lib]=$found
      queue+=("$sysroot/$found")
    done
  done
  for lib in "${seen[@]}"; do printf '%s\n' "$lib"; done
  printf '%s\n' lib64/ld-linux-x86-64.so.2
}

# sysroot_resolve SYSROOT PATH -> the real file behind PATH, following symlinks inside
# SYSROOT (an absolute link target such as lib64/ld-linux-x86-64.so.2's must not escape
# to the build host's own files).
sysroot_resolve() {
  local sysroot=$1 rel=$2 target n=0
  while [ -L "$sysroot/$rel" ]; do
    n=$((n + 1)); [ "$n" -lt 40 ] || die "symlink loop at $rel"
    target=$(readlink "$sysroot/$rel")
    case $target in
      /*) rel=${target#/} ;;
      *) rel=$(dirname "$rel")/$target ;;
    esac
  done
  [ -f "$sysroot/$rel" ] || die "$rel is not in the unpacked packages"
  printf '%s\n' "$sysroot/$rel"
}

# modules_closure MODDIR NAME... -> module paths (relative to MODDIR) in load order,
# dependencies first, from modules.dep. Names that are built into the kernel are skipped.
modules_closure() {
  local moddir=$1; shift
  awk -v want="$*" '
    function base(p) { sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); return p }
    function visit(p,   n, i, d) {
      if (p in done) return
      done[p] = 1
      n = split(deps[p], d, " ")
      for (i = n; i >= 1; i--) visit(d[i])   # modules.dep lists the deepest dependency last
      print p
    }
    FILENAME ~ /modules\.builtin$/ { builtin[base($0)] = 1; next }
    { p = $1; sub(/:$/, "", p); byname[base(p)] = p; $1 = ""; deps[p] = $0 }
    END {
      n = split(want, w, " ")
      for (i = 1; i <= n; i++) {
        m = w[i]; gsub(/-/, "_", m)
        if (m in builtin) continue
        if (!(m in byname)) { print "unknown module " w[i] > "/dev/stderr"; exit 1 }
        visit(byname[m])
      }
    }' "$moddir/modules.builtin" "$moddir/modules.dep"
}

# cpio_newc_entry NAME MODE RDEV_MAJOR RDEV_MINOR INO: one empty newc entry (a directory or
# a device node), so the initramfs carries /dev/console without mknod (root-only).
cpio_newc_entry() {
  local name=$1 mode=$2 rmaj=$3 rmin=$4 ino=$5 namesize pad
  namesize=$(( ${#name} + 1 ))
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    "$ino" "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0
  printf '%s\0' "$name"
  pad=$(( (4 - (110 + namesize) % 4) % 4 ))
  [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero
}

# initramfs_pack DIR OUT: newc cpio of DIR (owned by root, stable order) plus /dev/console,
# gzip-compressed.
initramfs_pack() {
  local dir=$1 out=$2
  if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  fi
  {
    (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort |
      cpio --quiet -o -H newc -R 0:0 --reproducible)
    # A second archive appended to the first: the kernel unpacks them in sequence.
    cpio_newc_entry dev $((8#040755)) 0 0 900001
    cpio_newc_entry dev/console $((8#020600)) 5 1 900002
    cpio_newc_entry TRAILER!!! 0 0 0 0
  } | gzip -9 -n >"$out"
}

# uki_build STUB VMLINUZ INITRD CMDLINE OSREL OUT: a unified kernel image. Each section
# goes at a VMA past the stub's last section, aligned to 4 KiB, in the order
# .osrel .cmdline .linux .initrd (systemd's UKI layout).
uki_build() {
  local stub=$1 vmlinuz=$2 initrd=$3 cmdline=$4 osrel=$5 out=$6
  local align=4096 end args=() name file size
  # awk may be mawk (no strtonum), so the hex arithmetic is done by the shell.
  end=0
  while read -r size vma; do
    if [ $((0x$vma + 0x$size)) -gt "$end" ]; then end=$((0x$vma + 0x$size)); fi
  done < <(objdump -h "$stub" | awk '$1 ~ /^[0-9]+$/ {print $3, $4}')
  for name in osrel cmdline linux initrd; do
    case $name in
      osrel) file=$osrel ;; cmdline) file=$cmdline ;; linux) file=$vmlinuz ;; initrd) file=$initrd ;;
    esac
    end=$(( (end + align - 1) / align * align ))
    args+=(--add-section ".$name=$file" --change-section-vma ".$name=$(printf '0x%x' "$end")")
    end=$(( end + $(stat -c %s "$file") ))
  done
  objcopy "${args[@]}" "$stub" "$out"
  pe_clear_timestamp "$out"
}

# pe_clear_timestamp FILE: objcopy stamps PE files with the current time (binutils 2.40 has
# no option against it and ignores SOURCE_DATE_EPOCH); zero it and fix the PE checksum
# incrementally (one's-complement sum of 16-bit words plus the file length), so equal inputs
# give an identical UKI.
u32_at() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }   # u32_at FILE OFFSET
put_u32() {                                                  # put_u32 FILE OFFSET VALUE
  printf '%b' "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($3 & 255)) $(($3 >> 8 & 255)) \
    $(($3 >> 16 & 255)) $(($3 >> 24 & 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
pe_clear_timestamp() {
  local f=$1 pe ts csum len sum w
  pe=$(u32_at "$f" 60)
  ts=$(u32_at "$f" $((pe + 8)))
  [ "$ts" -ne 0 ] || return 0
  csum=$(u32_at "$f" $((pe + 88)))
  len=$(stat -c %s "$f")
  sum=$((csum - len))
  for w in $((ts & 0xffff)) $((ts >> 16)); do
    sum=$((sum + (0xffff ^ w)))
    sum=$(((sum & 0xffff) + (sum >> 16)))
  done
  put_u32 "$f" $((pe + 8)) 0
  put_u32 "$f" $((pe + 88)) $((sum + len))
}

# esp_build OUT SIZE_MIB SRC_FILE DEST_PATH...: a FAT32 EFI system partition image built on
# a plain file with mtools. Pairs of SRC DEST (e.g. EFI/BOOT/BOOTX64.EFI).
esp_build() {
  local out=$1 size_mib=$2; shift 2
  local src dest dir part parts
  rm -f "$out"
  mkfs.vfat -F 32 -n ESP -i 51a7e500 --invariant -C "$out" $(( size_mib * 1024 )) >/dev/null
  while [ $# -gt 0 ]; do
    src=$1 dest=$2; shift 2
    dir=""
    IFS=/ read -ra parts <<<"$(dirname "$dest")"
    for part in "${parts[@]}"; do
      dir="$dir/$part"
      mmd -D s -i "$out" "::$dir" 2>/dev/null || true
    done
    mcopy -o -i "$out" "$src" "::/$dest"
  done
}

# gpt_assemble OUT TOTAL_MIB ESP_IMG DATA_NAME [DATA_UUID]: raw GPT disk, ESP at 1 MiB, the
# rest an empty (zeroed) Linux partition named DATA_NAME. sfdisk works on the plain file; the
# ESP is copied in with dd. `gpt_part_range` tells where the data partition landed.
gpt_assemble() {
  local out=$1 total_mib=$2 esp=$3 data_name=$4 data_uuid=${5:-$GPT_UUID_DATA} esp_sectors
  esp_sectors=$(( $(stat -c %s "$esp") / 512 ))
  rm -f "$out"
  truncate -s "${total_mib}M" "$out"
  sfdisk --quiet --no-reread --no-tell-kernel "$out" >/dev/null <<SFDISK
label: gpt
label-id: 6A1C5C5E-0C1D-4C9E-9D55-7E51A7E5C0DE
unit: sectors
first-lba: 2048
start=2048, size=$esp_sectors, type=$GPT_TYPE_ESP, uuid=$GPT_UUID_ESP, name="ESP"
type=$GPT_TYPE_LINUX, uuid=$data_uuid, name="$data_name"
SFDISK
  dd if="$esp" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
}

# gpt_part_range DISK N -> "START SIZE" of partition N, in 512-byte sectors.
gpt_part_range() {
  sfdisk --dump "$1" 2>/dev/null | awk -v n="$2" '
    $1 ~ /^\// && ++i == n {
      for (f = 2; f <= NF; f++) {
        if ($f == "start=") s = $(f + 1); if ($f == "size=") z = $(f + 1)
      }
      gsub(/,/, "", s); gsub(/,/, "", z); print s, z; found = 1
    }
    END { exit !found }'
}

# files_digest FILE...: one sha256 over the named files' contents and names.
files_digest() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }
