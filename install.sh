#!/usr/bin/env bash
# Provisions a Debian 12 host for qudata-agent (as root).
#
#   curl -fsSL <release>/install.sh | sudo bash -s -- ak-YOUR-API-KEY [OPTIONS]
#   ./install.sh [ak-KEY] [--dry-run] [--root DIR] [--hugepages-gib N] [--image-no-nvidia]
#                          production: packages, IOMMU (GRUB) and VFIO modules, the agent,
#                          frpc and the base image (SHA-256 checked), the systemd unit; the
#                          key as the argument or QUDATA_API_KEY (never echoed);
#                          --hugepages-gib N (or INSTALL_HUGEPAGES_GIB) reserves N GiB of
#                          1 GiB huge pages for VMs' memory at every boot (GRUB), and now as far
#                          as memory allows; --hugepages-gib 0 gives them back
#   ./install.sh --uninstall [--purge] [--dry-run] [--root DIR]
#                          stops the agent and every instance (recover --stop-all), gives the
#                          GPUs back, and undoes what the install manifest recorded; keeps the
#                          data dir (images, identity) unless --purge
#   ./install.sh --local   install what is missing, build the agent, run it in local mode
#   ./install.sh --packages FILE
#                          install the Debian packages listed in FILE (used by the tests)
#
# Production mode takes the agent, its unit and the GRUB drop-in from the release artefact
# (scripts/dist.sh makes it) at INSTALL_RELEASE_URL (default: the project's latest release),
# checked against the .sha256 published beside it (or INSTALL_RELEASE_SHA256) and against its
# own SHA256SUMS; run from a checkout without INSTALL_RELEASE_URL, it builds the agent instead.
# It also reads INSTALL_AGENT_BINARY (an agent to install instead),
# INSTALL_FRPC_URL + INSTALL_FRPC_SHA256 (default: frp v0.61.0, pinned) and
# INSTALL_IMAGE_URL + INSTALL_IMAGE_SHA256 (the base image). Without them, and with no
# /var/lib/qudata/images/base.qcow2 yet, it builds the production guest from Debian packages
# (image-builder/build-guest.sh, minutes; with the NVIDIA driver unless --image-no-nvidia or
# INSTALL_IMAGE_NO_NVIDIA=1) and makes base.qcow2 a link to it. --dry-run prints
# what would be done; --root DIR installs into DIR and leaves the host alone (no packages,
# modprobe, update-grub or systemctl). Running it again changes nothing that is up to date.
#
# Local mode needs no control plane and no frpc: it builds the small CI guest (image-builder/)
# as its base image, and the agent prints a generated secret and example curl commands.
set -euo pipefail
# From a pipe ($0 is the shell) this stays in the working directory.
cd "$(dirname "$0")"

usage() {
  if [ -f "$0" ]; then
    sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'
  else
    echo "usage: curl -fsSL <release>/install.sh | sudo bash -s -- ak-YOUR-API-KEY [--dry-run] [--root DIR] [--hugepages-gib N]"
  fi
  exit "${1:-0}"
}

# QEMU comes from bookworm-backports, like the qemu-utils these hosts already carry: mixing
# QEMU 7.2 from bookworm with qemu-img 10 is not a combination anyone tests.
BACKPORTS_PKGS=" qemu-system-x86 qemu-system-common qemu-system-data qemu-utils qemu-block-extra ovmf "
BACKPORTS_LIST=/etc/apt/sources.list.d/bookworm-backports.sources

enable_backports() {
  [ -e "$BACKPORTS_LIST" ] && return 0
  grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  cat >"$BACKPORTS_LIST" <<'LIST'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
LIST
}

install_packages() {
  local missing=() backports=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' && continue
    if [[ "$BACKPORTS_PKGS" == *" $pkg "* ]]; then backports+=("$pkg"); else missing+=("$pkg"); fi
  done
  [ $((${#missing[@]} + ${#backports[@]})) -eq 0 ] && return 0
  echo "install.sh: installing ${missing[*]} ${backports[*]}"
  export DEBIAN_FRONTEND=noninteractive
  [ ${#backports[@]} -gt 0 ] && enable_backports
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ ${#backports[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${backports[@]}" >/dev/null
  fi
}

# Package names from a list file: one per line, `#` starts a comment.
packages_in() { sed 's/#.*//' "$1" | tr -s ' \t' '\n' | grep -v '^$'; }

build_agent() {
  command -v cargo >/dev/null || { echo "install.sh: cargo (Rust 1.95) is required" >&2; exit 1; }
  cargo build --release --locked
}

# What local mode runs: QEMU with OVMF, the seed tools, the guests' network (bridge and taps
# with iproute2, rules with nftables, DHCP and DNS with dnsmasq, conntrack to forget a deleted
# guest's connections), an SSH client for the newcomer.
LOCAL_PKGS=(ca-certificates curl qemu-system-x86 qemu-utils ovmf dosfstools mtools iproute2
  nftables dnsmasq-base conntrack openssh-client)

# Local mode boots the small CI guest; build it (cached, skipped when up to date) and make it
# the default base image unless one is already there.
prepare_local_image() {
  local data_dir="${QUDATA_DATA_DIR:-/var/lib/qudata}"
  local images="$data_dir/images"
  # Traverse-only for QEMU's unprivileged user, which reads the base image (0644).
  install -d -m 0711 "$data_dir"
  install -d -m 0711 "$images"
  image-builder/build-ci-guest.sh "$images" >/dev/null
  [ -e "$images/base.qcow2" ] || ln -s ci-guest.qcow2 "$images/base.qcow2"
}

# ---------------------------------------------------------------------------------------------
# Production mode. Every step is a function; each one is idempotent (compares before it
# writes) and writes atomically (a temp file in the target's directory, then a rename).

# frp v0.61.0, from frp's published frp_sha256_checksums.txt.
FRPC_PINNED_URL=https://github.com/fatedier/frp/releases/download/v0.61.0/frp_0.61.0_linux_amd64.tar.gz
FRPC_PINNED_SHA256=720a9fe2a3299346572544909a78c023344c88bde13c55b921e298e8c5ded21f
PROD_PKGS=(ca-certificates curl tar qemu-system-x86 qemu-utils ovmf dosfstools mtools kmod pciutils
  iproute2 nftables dnsmasq-base conntrack)
VFIO_MODULES=(vfio vfio_pci vfio_iommu_type1)
UNIT=qudata-agent.service

# The release artefact (scripts/dist.sh) and where it is published.
RELEASE_DEFAULT_URL=https://github.com/qubu-group/qudata-agent/releases/latest/download
RELEASE_NAME=qudata-agent-x86_64-linux.tar.gz

DRY_RUN=0
REBOOT=0
ROOT=/
SRC=""      # where the agent's unit and GRUB drop-in (and a release's agent) are
SRC_KIND="" # checkout (build the agent), unpacked (a release beside this script), download
CREATED=()  # paths this run created: removed again when the run fails
REPLACED=() # files this run replaced (their originals kept in the backup dir)
# Every path an install created or replaced, so --uninstall can undo it (0600, one
# "created <path>" or "replaced <path>" per line, paths as on the host).
MANIFEST=/var/lib/qudata/install-manifest
BACKUP=/var/lib/qudata/install-backup
USER_CREATED=0
SCRATCH=""  # a private temp dir, always removed
CHANGED=0   # the agent's binary, unit or settings changed: a running agent is restarted
IMAGE_UP_TO_DATE=0
IMAGE_NO_NVIDIA=${INSTALL_IMAGE_NO_NVIDIA:-0}  # 1: a built base image has no NVIDIA driver
HUGEPAGES_GIB=${INSTALL_HUGEPAGES_GIB:-}  # empty: huge pages are left as they are

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
# A host path inside the target root.
at() { printf '%s%s' "${ROOT%/}" "$1"; }
dry() { [ "$DRY_RUN" = 1 ]; }

# On failure, removes what this run created (newest first), so nothing is left half-written.
finish() {
  local status=$? i p
  [ -n "$SCRATCH" ] && rm -rf -- "$SCRATCH"
  if [ "$status" -ne 0 ]; then
    # Originals first (their copies are among what this run created).
    for p in "${REPLACED[@]}"; do
      cp -a -- "$(at "$BACKUP")$p" "$(at "$p")" 2>/dev/null || true
    done
    for ((i = ${#CREATED[@]} - 1; i >= 0; i--)); do
      p=${CREATED[i]}
      if [ -d "$p" ] && [ ! -L "$p" ]; then rmdir -- "$p" 2>/dev/null || true; else rm -f -- "$p"; fi
    done
    [ ${#CREATED[@]} -gt 0 ] && say "failed: removed what this run had created" >&2
  fi
  return "$status"
}

# make_dir DIR MODE: creates DIR (parents 0755) when missing, remembering what it created.
make_dir() {
  local dir=$1 mode=$2 d missing=()
  while [ ! -d "$dir" ]; do
    missing=("$dir" "${missing[@]}")
    dir=$(dirname "$dir")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if dry; then say "would create ${missing[-1]}"; return 0; fi
  for d in "${missing[@]}"; do
    CREATED+=("$d")
    if [ "$d" = "${missing[-1]}" ]; then mkdir -m "$mode" "$d"; else mkdir -m 0755 "$d"; fi
  done
}

# private_dir DIR: DIR exists with mode 0700.
private_dir() {
  make_dir "$1" 0700
  set_dir_mode "$1" 700
}

# set_dir_mode DIR MODE: an existing directory of other mode is changed, its mode before
# recorded for --uninstall.
set_dir_mode() {
  local old
  [ -d "$1" ] || return 0
  old=$(stat -c %a "$1")
  [ "$old" = "$2" ] && return 0
  if dry; then say "would chmod 0$2 $1"; return 0; fi
  chmod "0$2" "$1"
  MODES+=("$old ${1#"${ROOT%/}"}")
}
MODES=() # "<mode before> <path>" of directories whose mode this run changed

# traverse_dir DIR: DIR exists with mode 0711 (others may pass through, not list: QEMU's user
# reaches its VM's files and the base image below it).
traverse_dir() {
  make_dir "$1" 0711
  set_dir_mode "$1" 711
}

# The unprivileged user QEMU runs as (the agent makes it too when it is missing).
QEMU_USER=qudata-qemu
create_qemu_user() {
  # The host's user database is not under --root: the agent makes the user where it runs.
  if [ "$ROOT" != / ]; then say "skip: user $QEMU_USER (installing into $ROOT; the agent makes it)"; return 0; fi
  if getent passwd "$QEMU_USER" >/dev/null; then say "up to date: user $QEMU_USER"; return 0; fi
  if dry; then say "would create the system user $QEMU_USER"; return 0; fi
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "qudata-agent QEMU" "$QEMU_USER"
  USER_CREATED=1
  say "created the system user $QEMU_USER"
}

sha256_of() { sha256sum -- "$1" | cut -d' ' -f1; }

# put_file SRC DEST MODE: installs SRC as DEST atomically. Returns 1 ("up to date") when DEST
# already has that content and mode.
put_file() {
  local src=$1 dest=$2 mode=$3 tmp
  if [ -f "$dest" ] && cmp -s -- "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    say "up to date: $dest"
    return 1
  fi
  if dry; then say "would install $dest (mode $mode)"; return 0; fi
  make_dir "$(dirname "$dest")" 0755
  tmp="$(dirname "$dest")/.$(basename "$dest").new"
  keep_original "$dest"
  [ -e "$dest" ] || CREATED+=("$dest")
  CREATED+=("$tmp")
  install -m "$mode" -- "$src" "$tmp"
  sync -- "$tmp"
  mv -f -- "$tmp" "$dest"
  say "installed $dest"
}

# keep_original DEST: before a file the install did not make is replaced, a copy of it goes to
# the backup dir, so --uninstall puts it back.
keep_original() {
  local dest=$1 rel copy
  [ -f "$dest" ] || return 0
  rel=${dest#"${ROOT%/}"}
  in_manifest "$rel" && return 0
  copy="$(at "$BACKUP")$rel"
  [ -e "$copy" ] && return 0
  make_dir "$(at "$BACKUP")" 0700
  make_dir "$(dirname "$copy")" 0700
  CREATED+=("$copy")
  cp -a -- "$dest" "$copy"
  REPLACED+=("$rel")
}

# in_manifest REL: an earlier install recorded REL (created or replaced).
in_manifest() {
  [ -f "$(at "$MANIFEST")" ] && grep -qxF -e "created $1" -e "replaced $1" "$(at "$MANIFEST")"
}

# Appends what this run created and replaced to the manifest (atomically, 0600). Temp files
# are gone by now; what no longer exists is not recorded.
record_manifest() {
  local file new p rel
  dry && return 0
  file=$(at "$MANIFEST")
  traverse_dir "$(dirname "$file")"
  new="$SCRATCH/manifest"
  (
    umask 077
    { [ -f "$file" ] && cat -- "$file"
      for p in "${CREATED[@]}"; do
        [ -e "$p" ] || [ -L "$p" ] || continue
        rel=${p#"${ROOT%/}"}
        printf 'created %s\n' "${rel:-/}"
      done
      for rel in "${REPLACED[@]}"; do printf 'replaced %s\n' "$rel"; done
      for rel in "${MODES[@]}"; do
        in_manifest "${rel#* }" || printf 'chmod %s\n' "$rel"
      done
      if [ "$USER_CREATED" = 1 ]; then printf 'user %s\n' "$QEMU_USER"; fi
      if [ "$PERSISTENCED_DISABLED" = 1 ]; then printf 'disabled %s\n' nvidia-persistenced; fi
    } | awk '!seen[$0]++' >"$new"
  )
  # Nothing new (a run that found everything up to date): left as it is.
  if [ -f "$file" ] && cmp -s -- "$new" "$file"; then return 0; fi
  install -m 0600 -- "$new" "$file.new"
  mv -f -- "$file.new" "$file"
}

# fetch_verified URL SHA256 DEST: downloads URL to DEST (0600) only if its SHA-256 is right;
# a mismatch leaves nothing behind. Returns 1 when DEST already has that checksum.
fetch_verified() {
  local url=$1 sum=$2 dest=$3 tmp got
  if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$sum" ]; then
    say "up to date: $dest (sha256 ok)"
    return 1
  fi
  if dry; then say "would download $url to $dest (sha256 $sum)"; return 0; fi
  tmp="$(dirname "$dest")/.$(basename "$dest").part"
  CREATED+=("$tmp")
  say "downloading $url"
  (umask 077 && curl --fail --silent --show-error --location --retry 3 \
    --proto '=https,http,file' --proto-redir '=https' --output "$tmp" "$url") ||
    die "cannot download $url"
  got=$(sha256_of "$tmp")
  [ "$got" = "$sum" ] || die "sha256 mismatch for $url: expected $sum, got $got; refusing it"
  sync -- "$tmp"
  [ -e "$dest" ] || CREATED+=("$dest")
  mv -f -- "$tmp" "$dest"
  say "verified and installed $dest"
}

valid_url() { [[ $1 =~ ^(https|http|file)://[^[:space:]]+$ ]]; }
valid_sum() { [[ $1 =~ ^[0-9a-f]{64}$ ]]; }

# Every input is checked before anything is touched.
check_inputs() {
  if [[ $ROOT != /* ]] || [ ! -d "$ROOT" ]; then die "--root $ROOT: not an existing absolute directory"; fi
  if [ "$ROOT" = / ] && ! dry && [ "$(id -u)" != 0 ]; then die "run as root (or use --dry-run)"; fi
  FRPC_URL=${INSTALL_FRPC_URL:-$FRPC_PINNED_URL}
  FRPC_SHA256=${INSTALL_FRPC_SHA256:-}
  if [ -z "${INSTALL_FRPC_URL:-}" ]; then
    FRPC_SHA256=${FRPC_SHA256:-$FRPC_PINNED_SHA256}
    [ "$(uname -m)" = x86_64 ] || die "frpc is pinned for x86_64 only: set INSTALL_FRPC_URL and INSTALL_FRPC_SHA256"
  fi
  IMAGE_URL=${INSTALL_IMAGE_URL:-}
  [[ $IMAGE_NO_NVIDIA =~ ^[01]$ ]] || die "INSTALL_IMAGE_NO_NVIDIA must be 0 or 1"
  IMAGE_SHA256=${INSTALL_IMAGE_SHA256:-}
  FRPC_SHA256=${FRPC_SHA256,,}
  IMAGE_SHA256=${IMAGE_SHA256,,}
  valid_url "$FRPC_URL" || die "INSTALL_FRPC_URL must be an https://, http:// or file:// URL"
  valid_sum "$FRPC_SHA256" || die "INSTALL_FRPC_SHA256 must be 64 hex digits (the SHA-256 of the frp archive)"
  if [ -n "$IMAGE_URL$IMAGE_SHA256" ]; then
    valid_url "$IMAGE_URL" || die "INSTALL_IMAGE_URL must be an https://, http:// or file:// URL"
    valid_sum "$IMAGE_SHA256" || die "INSTALL_IMAGE_SHA256 must be 64 hex digits (the SHA-256 of the image)"
    # One that is there with other contents is never replaced: instances' overlays use it.
    IMAGE=$(at /var/lib/qudata/images/base.qcow2)
    if [ -e "$IMAGE" ]; then
      [ "$(sha256_of "$IMAGE")" = "$IMAGE_SHA256" ] ||
        die "$IMAGE exists with other contents; instances are built on it, so it is not replaced (move it away first)"
      IMAGE_UP_TO_DATE=1
    fi
  fi
  if [ -n "$HUGEPAGES_GIB" ] && { [[ ! $HUGEPAGES_GIB =~ ^[0-9]{1,5}$ ]] || [ "$HUGEPAGES_GIB" -gt 65536 ]; }; then
    die "--hugepages-gib $HUGEPAGES_GIB: give a whole number of GiB, 0-65536 (0 gives the pages back)"
  fi
  RELEASE_URL=${INSTALL_RELEASE_URL:-$RELEASE_DEFAULT_URL}
  RELEASE_URL=${RELEASE_URL%/}
  RELEASE_SHA256=${INSTALL_RELEASE_SHA256:-}
  RELEASE_SHA256=${RELEASE_SHA256,,}
  valid_url "$RELEASE_URL" || die "INSTALL_RELEASE_URL must be an https://, http:// or file:// URL"
  if [ -n "$RELEASE_SHA256" ]; then
    valid_sum "$RELEASE_SHA256" || die "INSTALL_RELEASE_SHA256 must be 64 hex digits (the SHA-256 of $RELEASE_NAME)"
  fi
  find_sources
  AGENT_BINARY=${INSTALL_AGENT_BINARY:-}
  if [ -n "$AGENT_BINARY" ] && [ ! -x "$AGENT_BINARY" ]; then
    die "INSTALL_AGENT_BINARY=$AGENT_BINARY is not an executable file"
  fi
  local env_file; env_file=$(at /etc/qudata/agent.env)
  if [ -n "${QUDATA_API_KEY:-}" ]; then
    # Checked without echoing it; the character set keeps the EnvironmentFile line literal.
    [[ $QUDATA_API_KEY =~ ^ak-[A-Za-z0-9._~+/=:@-]+$ ]] ||
      die "QUDATA_API_KEY is not a Qudata API key (ak-...); nothing was written"
  elif ! grep -qs '^QUDATA_API_KEY=' "$env_file"; then
    die "no API key: give it as the argument (bash -s -- ak-...) or in QUDATA_API_KEY"
  fi
}

# Where the agent's files come from: a checkout (the agent is built), a release unpacked
# beside this script, or the release artefact downloaded (from a pipe, or INSTALL_RELEASE_URL).
find_sources() {
  if [ -n "${INSTALL_RELEASE_URL:-}" ]; then
    SRC_KIND=download
  elif [ -f SHA256SUMS ] && [ -f VERSION ] && [ -f qudata-agent ]; then
    SRC_KIND=unpacked SRC=$PWD
  elif [ -f Cargo.toml ] && [ -f "systemd/$UNIT" ]; then
    SRC_KIND=checkout SRC=$PWD
  else
    SRC_KIND=download
  fi
}

# The release artefact into the scratch dir: its SHA-256 against the one published beside it
# (or INSTALL_RELEASE_SHA256), then every file against its SHA256SUMS. Nothing of a release
# that does not match is used, and nothing of it is left (the scratch dir goes).
fetch_release() {
  local url="$RELEASE_URL/$RELEASE_NAME" tarball="$SCRATCH/$RELEASE_NAME" sum=$RELEASE_SHA256 got
  local get=(curl --fail --silent --show-error --location --retry 3 --proto '=https,http,file' --proto-redir '=https')
  if [ -z "$sum" ]; then
    "${get[@]}" --output "$tarball.sha256" "$url.sha256" || die "cannot download $url.sha256"
    sum=$(cut -d' ' -f1 <"$tarball.sha256")
    sum=${sum,,}
    valid_sum "$sum" || die "$url.sha256 holds no SHA-256"
  fi
  say "downloading $url"
  "${get[@]}" --output "$tarball" "$url" || die "cannot download $url"
  got=$(sha256_of "$tarball")
  [ "$got" = "$sum" ] || die "sha256 mismatch for $url: expected $sum, got $got; refusing it"
  tar -xzf "$tarball" -C "$SCRATCH" --no-same-owner
  SRC="$SCRATCH/qudata-agent"
  check_release
}

# Every file of the release matches its SHA256SUMS, and the parts the install uses are there.
check_release() {
  local f
  (cd "$SRC" && sha256sum --quiet --strict -c SHA256SUMS) >/dev/null 2>&1 ||
    die "the release in $SRC does not match its SHA256SUMS; refusing it"
  for f in qudata-agent "systemd/$UNIT" grub/qudata-iommu.cfg VERSION; do
    [ -f "$SRC/$f" ] || die "the release in $SRC has no $f; refusing it"
  done
  say "release $(cat "$SRC/VERSION") verified"
}

prepare_sources() {
  case $SRC_KIND in
    download) fetch_release ;;
    unpacked) check_release ;;
    checkout) say "installing from the checkout in $SRC" ;;
  esac
}

install_production_packages() {
  if [ "$ROOT" != / ]; then say "skip: packages (installing into $ROOT)"; return 0; fi
  if dry; then
    local pkg missing=()
    for pkg in "${PROD_PKGS[@]}"; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    say "would install packages: ${missing[*]:-none missing}"
    return 0
  fi
  install_packages "${PROD_PKGS[@]}"
}

fetch_frpc_archive() {
  FRPC_ARCHIVE="$(at /var/cache/qudata)/$(basename "${FRPC_URL%%[?#]*}")"
  private_dir "$(dirname "$FRPC_ARCHIVE")"
  fetch_verified "$FRPC_URL" "$FRPC_SHA256" "$FRPC_ARCHIVE" || true
}

fetch_base_image() {
  local dest; dest=$(at /var/lib/qudata/images/base.qcow2)
  if [ -z "$IMAGE_URL" ]; then
    if [ -e "$dest" ] || [ -L "$dest" ]; then say "base image: keeping $dest"; return 0; fi
    build_base_image "$dest"
    return 0
  fi
  # Checked by check_inputs: hashing a large image once is enough.
  if [ "$IMAGE_UP_TO_DATE" = 1 ]; then say "up to date: $dest (sha256 ok)"; return 0; fi
  traverse_dir "$(at /var/lib/qudata)"
  traverse_dir "$(dirname "$dest")"
  fetch_verified "$IMAGE_URL" "$IMAGE_SHA256" "$dest" || true
  # Read by QEMU's user (as the backing file of every overlay), written by nobody.
  if [ -f "$dest" ] && ! dry; then chmod 0644 "$dest"; fi
}

# No image given and none there: the production guest is built from Debian packages (the
# builder in the checkout or release; cached, so a rerun after a failure reuses its work) and
# base.qcow2 is made a link to it.
build_base_image() {
  local dest=$1 images builder flags=() pkgs
  images=$(dirname "$dest")
  builder="${SRC:-$PWD}/image-builder/build-guest.sh"
  if [ ! -f "$builder" ]; then
    say "WARNING: no base image (set INSTALL_IMAGE_URL and INSTALL_IMAGE_SHA256) and no $builder to build one: instances cannot be created until $dest exists" >&2
    return 0
  fi
  [ "$IMAGE_NO_NVIDIA" = 1 ] && flags+=(--no-nvidia)
  mapfile -t pkgs < <(packages_in "$(dirname "$builder")/packages.txt")
  if dry; then
    say "would build the base image: $builder --out $images/guest.qcow2 ${flags[*]:-(with the NVIDIA driver)}, then link $dest -> guest.qcow2"
    if [ "$ROOT" = / ]; then say "would install the image builder's packages: ${pkgs[*]}"; fi
    return 0
  fi
  if [ "$ROOT" = / ]; then install_packages "${pkgs[@]}"; fi
  traverse_dir "$(at /var/lib/qudata)"
  traverse_dir "$images"
  say "building the base image (Debian packages; this takes minutes): $images/guest.qcow2 ${flags[*]:-}"
  QUDATA_IMAGE_CACHE="$(at /var/cache/qudata)/image-builder" \
    bash "$builder" --out "$images/guest.qcow2" "${flags[@]}" >/dev/null ||
    die "building the base image failed (see above); rerun to continue from the cache, or set INSTALL_IMAGE_URL"
  # Read by QEMU's user (as the backing file of every overlay), written by nobody.
  chmod 0644 "$images/guest.qcow2"
  ln -s guest.qcow2 "$dest"
  CREATED+=("$dest")
  say "base image: $dest -> guest.qcow2 (manifest: $images/guest.qcow2.manifest)"
}

install_frpc() {
  local bin
  if dry && [ ! -f "$FRPC_ARCHIVE" ]; then say "would install $(at /usr/local/bin/frpc) from the archive"; return 0; fi
  tar -xzf "$FRPC_ARCHIVE" -C "$SCRATCH" --no-same-owner
  bin=$(find "$SCRATCH" -maxdepth 2 -type f -name frpc -print -quit)
  [ -n "$bin" ] || die "$FRPC_ARCHIVE holds no frpc"
  put_file "$bin" "$(at /usr/local/bin/frpc)" 0755 || true
}

install_agent() {
  local bin=$AGENT_BINARY
  if [ -z "$bin" ] && [ "$SRC_KIND" = checkout ]; then
    bin=target/release/qudata-agent
    if dry; then say "would build the agent (cargo build --release)"; else build_agent; fi
  elif [ -z "$bin" ]; then
    bin="$SRC/qudata-agent"
  fi
  if put_file "$bin" "$(at /usr/local/bin/qudata-agent)" 0755; then CHANGED=1; fi
}

install_unit() {
  if put_file "$SRC/systemd/$UNIT" "$(at /etc/systemd/system/$UNIT)" 0644; then CHANGED=1; fi
}

# /etc/qudata/agent.env (0600): the API key, plus any setting the operator added, kept.
# ... and QUDATA_BACKEND when the host preparation chose one (BACKEND_CHOICE).
write_env_file() {
  local env_file new
  env_file=$(at /etc/qudata/agent.env)
  private_dir "$(dirname "$env_file")"
  if [ -z "${QUDATA_API_KEY:-}" ] && [ -z "$BACKEND_CHOICE" ]; then
    say "up to date: $env_file (QUDATA_API_KEY not given)"
    return 0
  fi
  new="$SCRATCH/agent.env"
  # printf is a builtin: the key never appears in a process's argv. The umask covers the
  # redirection too, so the file is never readable by others, even for a moment.
  (
    umask 077
    {
      if [ -f "$env_file" ]; then
        local drop='^$^'
        [ -n "${QUDATA_API_KEY:-}" ] && drop='^QUDATA_API_KEY='
        [ -n "$BACKEND_CHOICE" ] && drop="$drop|^QUDATA_BACKEND="
        grep -Ev "$drop" "$env_file" || true
      else
        printf '%s\n' "# qudata-agent settings (README.md, Configuration). 0600: holds the API key."
      fi
      if [ -n "${QUDATA_API_KEY:-}" ]; then printf 'QUDATA_API_KEY=%s\n' "$QUDATA_API_KEY"; fi
      if [ -n "$BACKEND_CHOICE" ]; then printf 'QUDATA_BACKEND=%s\n' "$BACKEND_CHOICE"; fi
    } >"$new"
  )
  if put_file "$new" "$env_file" 0600; then CHANGED=1; fi
}

# ---------------------------------------------------------------------------------------------
# Host preparation for passthrough, decided from what sysfs shows (INSTALL_SYSFS_ROOT, default
# the target root's /sys) and shown before it is done. NVIDIA GPUs and their IOMMU groups are
# listed; a GPU whose group holds a device a host driver uses (other than bridges and the
# GPU's own functions) cannot be passed through, and neither can any GPU while the IOMMU is
# off after the reboot that turns it on: such hosts get the Docker backend. Otherwise the
# GPUs' ids go to vfio-pci at boot (before nvidia or nouveau can take them), nouveau is
# blacklisted and nvidia-persistenced is stopped (it holds the GPUs open).
BACKEND_CHOICE=""    # qemu or docker, written to the env file; empty: left to the agent (auto)
KERNEL_CHANGED=0     # the kernel command line or the boot modules changed: a reboot is due
GPU_IDS=""           # vendor:device of every function of the GPUs' slots, comma-separated
PASSTHROUGH_PENDING=0 # GPUs, but the IOMMU is off until the reboot

sysfs() { printf '%s' "${INSTALL_SYSFS_ROOT:-$(at /sys)}"; }

# How many IOMMU groups the kernel made (0: the IOMMU is off).
iommu_group_count() {
  local dir n=0
  for dir in "$(sysfs)"/kernel/iommu_groups/*; do [ -d "$dir" ] && n=$((n + 1)); done
  printf '%s' "$n"
}

# Prints "address vendor:device class group" for every NVIDIA GPU (display class).
nvidia_gpus() {
  local dev addr vendor class device group
  for dev in "$(sysfs)"/bus/pci/devices/*; do
    [ -e "$dev/vendor" ] || continue
    addr=$(basename "$dev")
    vendor=$(<"$dev/vendor") class=$(<"$dev/class") device=$(<"$dev/device")
    [ "$vendor" = 0x10de ] || continue
    case $class in 0x0300*|0x0302*) ;; *) continue ;; esac
    group=$(basename "$(readlink "$dev/iommu_group" 2>/dev/null)" 2>/dev/null)
    printf '%s %s:%s %s %s\n' "$addr" "${vendor#0x}" "${device#0x}" "$class" "${group:--}"
  done
}

# Why GPU $1 in group $2 cannot be passed through, or nothing when it can.
shared_group_reason() {
  local gpu=$1 group=$2 member addr class driver
  for member in "$(sysfs)/kernel/iommu_groups/$group/devices"/*; do
    [ -e "$member" ] || continue
    addr=$(basename "$member")
    [ "${addr%.*}" = "${gpu%.*}" ] && continue              # the GPU's own slot
    class=$(<"$member/class")
    case $class in 0x06*) continue ;; esac                   # bridges never move
    driver=$(basename "$(readlink "$member/driver" 2>/dev/null)" 2>/dev/null)
    [ -n "$driver" ] && [ "$driver" != vfio-pci ] &&
      { printf '%s (driver %s) shares its IOMMU group %s' "$addr" "$driver" "$group"; return 0; }
  done
  return 0
}

prepare_passthrough() {
  local gpus line addr id group why ids=() blocked=0 groups
  gpus=$(nvidia_gpus)
  if [ -z "$gpus" ]; then say "GPUs: no NVIDIA GPU found in $(sysfs); nothing to prepare for passthrough"; return 0; fi
  groups=$(iommu_group_count)
  while read -r addr id _ group; do
    local slot_ids f
    slot_ids=$id
    for f in "$(sysfs)/bus/pci/devices/${addr%.*}".*; do
      [ "$(basename "$f")" = "$addr" ] && continue
      [ "$(<"$f/vendor")" = 0x10de ] && slot_ids="$slot_ids $(<"$f/vendor"):$(<"$f/device")"
    done
    slot_ids=${slot_ids//0x/}
    why=""
    [ "$group" != - ] && why=$(shared_group_reason "$addr" "$group")
    say "GPU $addr ($id), IOMMU group $group${why:+: $why}"
    [ -n "$why" ] && blocked=1
    for f in $slot_ids; do [[ " ${ids[*]} " == *" $f "* ]] || ids+=("$f"); done
  done <<<"$gpus"
  GPU_IDS=$(IFS=,; printf '%s' "${ids[*]}")
  if [ "$blocked" = 1 ]; then
    BACKEND_CHOICE=docker
    say "passthrough is not possible on this host (a GPU shares its IOMMU group with a host device): the Docker backend"
    prepare_docker
    return 0
  fi
  BACKEND_CHOICE=qemu
  if [ "$groups" = 0 ]; then
    PASSTHROUGH_PENDING=1
    say "the IOMMU is off now: GPUs go to VMs once the reboot turns it on (checked after the reboot)"
  fi
  bind_gpus_at_boot
}

# vfio-pci takes the GPUs' ids at boot, before nvidia or nouveau; nouveau blacklisted;
# nvidia-persistenced stopped. The self-test runs first, while the NVIDIA driver has them.
bind_gpus_at_boot() {
  local conf="$SCRATCH/qudata-vfio-pci.conf" blacklist="$SCRATCH/qudata-nouveau.conf" changed=0
  run_selftest
  printf '%s\n' "# Installed by qudata-agent's install.sh: the GPUs go to vfio-pci at boot." \
    "options vfio-pci ids=$GPU_IDS" \
    "softdep nvidia pre: vfio-pci" "softdep nouveau pre: vfio-pci" \
    "softdep snd_hda_intel pre: vfio-pci" "softdep xhci_pci pre: vfio-pci" >"$conf"
  printf '%s\n' "# Installed by qudata-agent's install.sh: nouveau cannot give a GPU back safely." \
    "blacklist nouveau" "options nouveau modeset=0" >"$blacklist"
  if put_file "$conf" "$(at /etc/modprobe.d/qudata-vfio-pci.conf)" 0644; then changed=1; fi
  if put_file "$blacklist" "$(at /etc/modprobe.d/qudata-blacklist-nouveau.conf)" 0644; then changed=1; fi
  if [ "$changed" = 1 ]; then
    KERNEL_CHANGED=1
    if [ "$ROOT" != / ]; then say "skip: update-initramfs (installing into $ROOT)"
    elif dry; then say "would run: update-initramfs -u"
    elif command -v update-initramfs >/dev/null; then update-initramfs -u || die "update-initramfs failed (see above)"
    fi
  fi
  stop_persistenced
}

# nvidia-persistenced keeps /dev/nvidia* open, so the driver never lets a GPU go.
stop_persistenced() {
  if [ "$ROOT" != / ] || [ ! -d /run/systemd/system ]; then return 0; fi
  systemctl is-enabled --quiet nvidia-persistenced 2>/dev/null || return 0
  if dry; then say "would run: systemctl disable --now nvidia-persistenced"; return 0; fi
  systemctl disable --now nvidia-persistenced
  PERSISTENCED_DISABLED=1
  say "disabled nvidia-persistenced (it holds the GPUs open)"
}
PERSISTENCED_DISABLED=0

# The agent's GPU self-test while the GPUs are still on the NVIDIA driver: their facts go to
# gpu-inventory.json, which the agent reads once they are on vfio-pci.
run_selftest() {
  local agent; agent=$(at /usr/local/bin/qudata-agent)
  if [ "$ROOT" != / ]; then say "skip: GPU self-test (installing into $ROOT)"; return 0; fi
  # Only while the driver has them: after they moved, a run would find none and overwrite a
  # good inventory with an empty one.
  local addr on_driver=0
  while read -r addr _; do
    [ -n "$addr" ] || continue
    [ "$(basename "$(readlink "$(sysfs)/bus/pci/devices/$addr/driver" 2>/dev/null)" 2>/dev/null)" = nvidia ] && on_driver=1
  done <<<"$(nvidia_gpus)"
  if [ "$on_driver" = 0 ]; then say "skip: GPU self-test (no GPU is on the NVIDIA driver now; the inventory is kept)"; return 0; fi
  if dry; then say "would run: qudata-agent selftest"; return 0; fi
  if [ -x "$agent" ] && "$agent" selftest --help >/dev/null 2>&1; then
    "$agent" selftest || say "WARNING: the GPU self-test found a problem (above); the inventory was written" >&2
  fi
}

# A host without passthrough runs containers: the engine from Debian; the NVIDIA container
# toolkit comes from NVIDIA's own repository, which this installer does not add.
prepare_docker() {
  if [ "$ROOT" != / ]; then say "skip: Docker engine (installing into $ROOT)"; return 0; fi
  if command -v dockerd >/dev/null; then say "up to date: Docker engine"; else
    if dry; then say "would install packages: docker.io"; else install_packages docker.io; fi
  fi
  command -v nvidia-container-toolkit >/dev/null || command -v nvidia-ctk >/dev/null ||
    say "install the NVIDIA container toolkit (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/install-guide.html) so containers get the GPUs"
}

# ---------------------------------------------------------------------------------------------
# The reboot phase. When the kernel command line or the boot modules changed, a one-shot unit
# finishes the install after the reboot (install.sh --finish): it checks the IOMMU is on and
# vfio-pci has the GPUs, falls back to Docker if not, then starts the agent and goes away.
FINISH_UNIT=qudata-install-finish.service
PENDING=/var/lib/qudata/install-pending
install_finish_unit() {
  local unit="$SCRATCH/$FINISH_UNIT" copy="$SCRATCH/install.sh"
  [ "$KERNEL_CHANGED" = 1 ] || [ "$PASSTHROUGH_PENDING" = 1 ] || return 0
  cat >"$unit" <<UNIT
# Installed by qudata-agent's install.sh: finishes the install after the reboot.
[Unit]
Description=qudata-agent install, after the reboot
ConditionPathExists=$PENDING
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/lib/qudata/install.sh --finish

[Install]
WantedBy=multi-user.target
UNIT
  install_self "$copy"
  put_file "$copy" "$(at /usr/local/lib/qudata/install.sh)" 0755 || true
  put_file "$unit" "$(at "/etc/systemd/system/$FINISH_UNIT")" 0644 || true
  local pending="$SCRATCH/pending"
  printf '%s\n' "reboot pending since the install" >"$pending"
  traverse_dir "$(at /var/lib/qudata)"
  put_file "$pending" "$(at "$PENDING")" 0600 || true
  if [ "$ROOT" = / ] && [ -d /run/systemd/system ] && ! dry; then systemctl daemon-reload; systemctl enable "$FINISH_UNIT"; fi
  say "reboot to finish: the kernel command line or boot modules changed ($FINISH_UNIT finishes the install after it)"
}

# This script's text (from its file, or the pipe it came from: kept by the caller).
install_self() {
  if [ -f "$0" ]; then cp -- "$0" "$1"; elif [ -n "${SRC:-}" ] && [ -f "$SRC/install.sh" ]; then cp -- "$SRC/install.sh" "$1"
  else die "cannot keep a copy of install.sh for after the reboot (run it from a file or a release)"; fi
}

# After the reboot (the one-shot unit), or by hand.
finish_after_reboot() {
  local groups state=ok
  while [ $# -gt 0 ]; do
    case "$1" in
      --finish) ;;
      --root) [ -n "${2:-}" ] || usage 2 >&2; ROOT=$2; shift ;;
      --root=*) ROOT=${1#--root=} ;;
      *) usage 2 >&2 ;;
    esac
    shift
  done
  [ -e "$(at "$PENDING")" ] || { say "nothing to finish"; print_state; return 0; }
  groups=$(iommu_group_count)
  if [ -n "$(nvidia_gpus)" ] && [ "$groups" = 0 ]; then
    say "the IOMMU is still off after the reboot: this host gets the Docker backend"
    BACKEND_CHOICE=docker state=docker
    SCRATCH=$(mktemp -d)
    trap finish EXIT
    write_env_file
    prepare_docker
  fi
  if [ "$state" = ok ]; then
    local addr driver
    while read -r addr _; do
      [ -n "$addr" ] || continue
      driver=$(basename "$(readlink "$(sysfs)/bus/pci/devices/$addr/driver" 2>/dev/null)" 2>/dev/null)
      [ "$driver" = vfio-pci ] ||
        say "GPU $addr is on ${driver:-no driver}, not vfio-pci, after the reboot: the agent moves it when a VM starts (check /etc/modprobe.d/qudata-vfio-pci.conf)"
    done <<<"$(nvidia_gpus)"
  fi
  rm -f -- "$(at "$PENDING")"
  if [ "$ROOT" = / ] && [ -d /run/systemd/system ]; then
    systemctl disable "$FINISH_UNIT" 2>/dev/null || true
    systemctl enable --now "$UNIT" || die "$UNIT did not start: journalctl -u $UNIT"
  fi
  say "finished after the reboot ($state)"
  print_state
}

# What the host is now: the IOMMU, each GPU's driver, the backend, the agent.
print_state() {
  local groups line addr
  groups=$(iommu_group_count)
  say "state: $groups IOMMU groups; backend $(sed -n 's/^QUDATA_BACKEND=//p' "$(at /etc/qudata/agent.env)" 2>/dev/null || true)"
  while read -r addr _; do
    [ -n "$addr" ] || continue
    line=$(basename "$(readlink "$(sysfs)/bus/pci/devices/$addr/driver" 2>/dev/null)" 2>/dev/null)
    say "state: GPU $addr on ${line:-no driver}"
  done <<<"$(nvidia_gpus)"
  if [ "$ROOT" = / ] && [ -d /run/systemd/system ]; then say "state: $UNIT $(systemctl is-active "$UNIT" 2>/dev/null || true)"; fi
}

install_vfio_modules() {
  local conf="$SCRATCH/qudata-vfio.conf"
  printf '%s\n' "# Installed by qudata-agent's install.sh: VFIO for GPU passthrough." \
    "${VFIO_MODULES[@]}" >"$conf"
  put_file "$conf" "$(at /etc/modules-load.d/qudata-vfio.conf)" 0644 || true
  if [ "$ROOT" != / ]; then say "skip: modprobe (installing into $ROOT)"; return 0; fi
  if dry; then say "would run: modprobe -a ${VFIO_MODULES[*]}"; return 0; fi
  modprobe -a "${VFIO_MODULES[@]}" || say "WARNING: cannot load ${VFIO_MODULES[*]} now; they load at boot" >&2
}

install_grub_dropin() {
  local dropin; dropin=$(at /etc/default/grub.d/qudata-iommu.cfg)
  if [ ! -e "$(at /etc/default/grub)" ]; then
    say "no /etc/default/grub: add intel_iommu=on iommu=pt to this boot loader's kernel command line"
    return 0
  fi
  if put_file "$SRC/grub/qudata-iommu.cfg" "$dropin" 0644; then
    KERNEL_CHANGED=1
  elif [ "$ROOT" != / ] || grep -qs 'iommu=' /boot/grub/grub.cfg; then
    # Up to date, and grub.cfg was regenerated with it (else an earlier update-grub failed).
    if [ "$ROOT" = / ] && ! grep -q 'iommu=' /proc/cmdline; then
      say "the running kernel has no IOMMU parameters yet: reboot to apply them"
    fi
    return 0
  fi
  if [ "$ROOT" != / ]; then
    say "skip: update-grub (installing into $ROOT)"
  elif dry; then
    say "would run: update-grub"
  else
    update-grub || die "update-grub failed (see above); run install.sh again once it works"
  fi
  say "reboot to turn the IOMMU on (the kernel command line changed)"
}

# update-grub after a drop-in changed (the host's only: never under --root).
regenerate_grub() {
  if [ "$ROOT" != / ]; then say "skip: update-grub (installing into $ROOT)"; return 0; fi
  if dry; then say "would run: update-grub"; return 0; fi
  update-grub || die "update-grub failed (see above); run install.sh again once it works"
}

# Huge pages for VMs' memory (opt-in, --hugepages-gib N). 1 GiB pages are reserved on the
# kernel command line: once memory is fragmented the kernel rarely finds 1 GiB runs, so only
# a boot-time reservation is sure (split evenly over the NUMA nodes, as the GPUs are). The
# drop-in is the record: it holds the count and the pool's size before it, and
# --hugepages-gib 0 removes it and gives the pages back.
HUGEPAGES_DROPIN=/etc/default/grub.d/qudata-hugepages.cfg
HUGEPAGES_POOL=/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages
install_hugepages() {
  [ -n "$HUGEPAGES_GIB" ] || return 0
  local dropin cfg before=0
  dropin=$(at "$HUGEPAGES_DROPIN")
  if [ "$ROOT" = / ] && [ -r "$HUGEPAGES_POOL" ]; then before=$(cat "$HUGEPAGES_POOL"); fi
  if [ -f "$dropin" ]; then before=$(sed -n 's/^# pool before: \([0-9]*\)$/\1/p' "$dropin"); fi
  if [ "$HUGEPAGES_GIB" = 0 ]; then
    if [ ! -e "$dropin" ]; then say "up to date: no huge pages reserved for VMs"; return 0; fi
    if dry; then say "would remove $dropin and give the huge pages back"; else rm -f -- "$dropin"; say "removed $dropin"; fi
    regenerate_grub
    set_hugepage_pool "${before:-0}"
    return 0
  fi
  if [ ! -e "$(at /etc/default/grub)" ]; then
    say "no /etc/default/grub: add hugepagesz=1G hugepages=$HUGEPAGES_GIB to this boot loader's kernel command line"
  else
    cfg="$SCRATCH/qudata-hugepages.cfg"
    cat >"$cfg" <<CFG
# Installed by qudata-agent's install.sh --hugepages-gib $HUGEPAGES_GIB as $HUGEPAGES_DROPIN.
# $HUGEPAGES_GIB GiB of 1 GiB huge pages for VMs' memory, reserved at boot and split over the
# NUMA nodes; install.sh --hugepages-gib 0 removes this file and gives the pages back.
# pool before: ${before:-0}
case " \${GRUB_CMDLINE_LINUX-} \${GRUB_CMDLINE_LINUX_DEFAULT-} " in
  *" hugepagesz=1G hugepages=$HUGEPAGES_GIB "*) ;;
  *) GRUB_CMDLINE_LINUX_DEFAULT="\${GRUB_CMDLINE_LINUX_DEFAULT:+\$GRUB_CMDLINE_LINUX_DEFAULT }hugepagesz=1G hugepages=$HUGEPAGES_GIB" ;;
esac
CFG
    if put_file "$cfg" "$dropin" 0644; then KERNEL_CHANGED=1; regenerate_grub; fi
  fi
  set_hugepage_pool "$HUGEPAGES_GIB"
}

# set_hugepage_pool N: asks the running kernel for N 1 GiB pages now and says how many it gave.
set_hugepage_pool() {
  if [ "$ROOT" != / ] || [ ! -w "$HUGEPAGES_POOL" ]; then say "skip: huge pages now (reserved at the next boot)"; return 0; fi
  if dry; then say "would set $HUGEPAGES_POOL to $1 now"; return 0; fi
  printf '%s\n' "$1" >"$HUGEPAGES_POOL" || true
  say "1 GiB huge pages now: $(cat "$HUGEPAGES_POOL") of $1 (the rest at the next boot)"
}

# A reboot is due: the agent starts after it (the one-shot unit starts it).
enable_for_the_reboot() {
  if [ "$ROOT" != / ] || [ ! -d /run/systemd/system ]; then say "skip: systemctl (installing into $ROOT)"; return 0; fi
  if dry; then say "would run: systemctl enable $UNIT (started after the reboot)"; return 0; fi
  systemctl daemon-reload
  systemctl enable "$UNIT"
}

# Reboots with --reboot, or when asked on a terminal; never otherwise.
reboot_if_asked() {
  local answer=""
  if dry; then say "dry run: nothing was changed; a reboot would be due"; return 0; fi
  if [ "$REBOOT" != 1 ] && [ "$ROOT" = / ] && [ -t 1 ] && { : </dev/tty; } 2>/dev/null; then
    printf 'install.sh: reboot now to finish? [y/N] ' >/dev/tty
    read -r answer </dev/tty || true
    [[ $answer == [yY]* ]] && REBOOT=1
  fi
  if [ "$REBOOT" = 1 ] && [ "$ROOT" = / ]; then say "rebooting"; systemctl reboot; exit 0; fi
  say "done; reboot to finish (install.sh --reboot does it)"
}

start_service() {
  if [ "$ROOT" != / ]; then say "skip: systemctl (installing into $ROOT)"; return 0; fi
  if [ ! -d /run/systemd/system ]; then say "skip: systemctl (systemd is not running here)"; return 0; fi
  if dry; then say "would run: systemctl daemon-reload && systemctl enable --now $UNIT"; return 0; fi
  systemctl daemon-reload
  # KillMode=process: a restart replaces the agent and leaves its VMs running.
  if [ "$CHANGED" = 1 ] && systemctl is-active --quiet "$UNIT"; then
    systemctl restart "$UNIT" || die "$UNIT did not restart: journalctl -u $UNIT"
  fi
  # With neither a base image nor a Docker engine the agent has no backend and stops with
  # that reason: enable it for the next boot instead of failing the install on it.
  if [ ! -e "$(at /var/lib/qudata/images/base.qcow2)" ] && [ ! -S /var/run/docker.sock ]; then
    systemctl enable "$UNIT"
    say "$UNIT is enabled but not started: no base image and no Docker engine yet; provide one, then systemctl start $UNIT"
    return 0
  fi
  systemctl enable --now "$UNIT" || die "$UNIT did not start: journalctl -u $UNIT"
  say "$UNIT is running; logs: journalctl -u $UNIT"
}

# The Go agent (v0.0.x) this agent replaces used the same unit name, binary path, data dir and
# frpc config (its scripts/install.py). When its unit is there (ExecStart without `run`), it is
# stopped and disabled (under --root: its wants links removed), and its unit (it holds the API
# key) and binary are kept in /var/lib/qudata/go-agent/ (0700) for a rollback before this run
# replaces them; what was done goes to upgrade.txt there, which makes a second run a no-op.
# Its agent_id, agent_secret and frpc.toml are left as they are: the agent reads them at its
# first start and keeps the same agent id and secret (src/control_plane/identity/go_agent.rs),
# so this script never reads the secret.
upgrade_from_go_agent() {
  local unit data keep id wants name
  unit=$(at /etc/systemd/system/qudata-agent.service)
  data=$(at /var/lib/qudata)
  keep="$data/go-agent"
  if [ -f "$keep/upgrade.txt" ]; then say "up to date: Go agent upgrade ($keep/upgrade.txt)"; return 0; fi
  if ! grep -qsE '^ExecStart=/usr/local/bin/qudata-agent( --test)?[[:space:]]*$' "$unit"; then
    if [ -f "$data/agent_id" ] && [ ! -e "$data/identity.json" ]; then
      say "Go agent state in $data: the agent takes over its agent id and secret at its first start"
    fi
    return 0
  fi
  id="unknown"
  if [ -f "$data/agent_id" ]; then id=$(<"$data/agent_id"); fi
  [[ $id =~ ^[0-9a-fA-F-]{36}$ ]] || id="unreadable ($data/agent_id)"
  say "Go agent found: $unit, agent id $id; the agent takes over its agent id and secret at its first start"
  if [ -f "$data/instance_state.json" ]; then
    say "WARNING: the Go agent has an instance ($data/instance_state.json): stopping it ends that VM" >&2
  fi
  if dry; then
    say "would stop and disable the Go agent ($UNIT) and keep its unit and binary in $keep"
    return 0
  fi
  if [ "$ROOT" = / ] && [ -d /run/systemd/system ]; then
    systemctl disable --now "$UNIT" || die "could not stop the Go agent: systemctl status $UNIT"
    if [ -f /etc/systemd/system/qudata-install-continue.service ]; then
      systemctl disable qudata-install-continue.service || true
    fi
  fi
  # Files only (all that --root allows; systemctl disable has removed them under /).
  wants=$(at /etc/systemd/system/multi-user.target.wants)
  for name in "$UNIT" qudata-install-continue.service; do
    if [ -L "$wants/$name" ]; then rm -f -- "$wants/$name"; fi
  done
  # Not in CREATED: a failure later in this run must not remove the only copy of the Go agent.
  mkdir -p -- "$data"
  if [ ! -d "$keep" ]; then mkdir -m 0700 -- "$keep"; fi
  install -m 0600 -- "$unit" "$keep/$UNIT"
  if [ -f "$(at /usr/local/bin/qudata-agent)" ]; then
    install -m 0700 -- "$(at /usr/local/bin/qudata-agent)" "$keep/qudata-agent"
  fi
  (
    umask 077
    {
      printf '# install.sh upgraded this host from the Go agent on %s\n' "$(date -u +%FT%TZ)"
      printf 'stopped and disabled: %s (the Go agent)\n' "$UNIT"
      printf 'kept for a rollback: %s/%s, %s/qudata-agent\n' "$keep" "$UNIT" "$keep"
      printf 'left in place: %s/agent_id, %s/agent_secret, %s\n' "$data" "$data" "$(at /etc/qudata/frpc.toml)"
      printf 'agent id %s: taken over by the agent at its first start (%s/go-agent-import.json)\n' "$id" "$data"
    } >"$keep/.upgrade.txt.new"
  )
  mv -f -- "$keep/.upgrade.txt.new" "$keep/upgrade.txt"
  say "stopped and disabled the Go agent; its unit and binary are in $keep (README: Upgrading from the Go agent)"
}

production() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --root) [ -n "${2:-}" ] || usage 2 >&2; ROOT=$2; shift ;;
      --root=*) ROOT=${1#--root=} ;;
      --hugepages-gib) [ -n "${2:-}" ] || usage 2 >&2; HUGEPAGES_GIB=$2; shift ;;
      --hugepages-gib=*) HUGEPAGES_GIB=${1#--hugepages-gib=} ;;
      --image-no-nvidia) IMAGE_NO_NVIDIA=1 ;;
      ak-*) QUDATA_API_KEY=$1 ;;
      --reboot) REBOOT=1 ;;
      *) usage 2 >&2 ;;
    esac
    shift
  done
  # Only this shell uses the key: no child gets it in its environment (nor in its argv).
  export -n QUDATA_API_KEY 2>/dev/null || true
  check_inputs
  SCRATCH=$(mktemp -d)
  trap finish EXIT
  install_production_packages
  for tool in curl sha256sum tar; do command -v "$tool" >/dev/null || die "$tool is required"; done
  # Downloads first: a bad checksum stops the run before anything else is installed.
  prepare_sources
  fetch_frpc_archive
  fetch_base_image
  upgrade_from_go_agent
  install_agent
  install_frpc
  create_qemu_user
  install_unit
  prepare_passthrough
  write_env_file
  install_vfio_modules
  install_grub_dropin
  install_hugepages
  install_finish_unit
  # Everything is in place: a service that then fails to start is for the operator to look
  # at (journalctl), not a reason to remove files systemd may already have loaded.
  record_manifest
  CREATED=()
  if [ "$KERNEL_CHANGED" = 1 ] || [ "$PASSTHROUGH_PENDING" = 1 ]; then
    enable_for_the_reboot
    reboot_if_asked
  else
    start_service
    print_state
  fi
  if dry; then say "dry run: nothing was changed"; else say "done"; fi
}

# ---------------------------------------------------------------------------------------------
# Uninstall: stop the agent and every instance (recover --stop-all gives the GPUs back), then
# undo what the manifest recorded, newest first: originals put back, created files removed,
# created directories removed when empty, the user removed, GRUB regenerated. The data dir
# (images, the agent's identity) stays unless --purge.
uninstall() {
  local purge=0 manifest line kind path p dirs=() files=() grub=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --uninstall) ;;
      --purge) purge=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --root) [ -n "${2:-}" ] || usage 2 >&2; ROOT=$2; shift ;;
      --root=*) ROOT=${1#--root=} ;;
      *) usage 2 >&2 ;;
    esac
    shift
  done
  if [[ $ROOT != /* ]] || [ ! -d "$ROOT" ]; then die "--root $ROOT: not an existing absolute directory"; fi
  if [ "$ROOT" = / ] && ! dry && [ "$(id -u)" != 0 ]; then die "run as root (or use --dry-run)"; fi
  manifest=$(at "$MANIFEST")
  [ -f "$manifest" ] || die "no install manifest ($manifest): nothing this installer did is known"
  stop_everything
  mapfile -t lines < <(tac -- "$manifest")
  for line in "${lines[@]}"; do
    kind=${line%% *} path=${line#* }
    case $kind in
      replaced)
        if dry; then say "would put back the original $path"; continue; fi
        if cp -a -- "$(at "$BACKUP")$path" "$(at "$path")"; then say "put back the original $path"; fi
        ;;
      created)
        # The data dir keeps images and identity unless --purge (which removes it whole).
        [[ $path == /var/lib/qudata || $path == /var/lib/qudata/* ]] && continue
        [ "$path" = /etc/default/grub.d/qudata-iommu.cfg ] && grub=1
        [ "$path" = /etc/default/grub.d/qudata-hugepages.cfg ] && grub=1
        if [ -d "$(at "$path")" ] && [ ! -L "$(at "$path")" ]; then dirs+=("$path"); else files+=("$path"); fi
        ;;
      user) remove_user "$path" ;;
      chmod)
        if dry; then say "would chmod 0${path%% *} ${path#* }"; continue; fi
        [ -d "$(at "${path#* }")" ] && chmod "0${path%% *}" "$(at "${path#* }")" ;;
      disabled)
        if [ "$ROOT" = / ] && ! dry; then systemctl enable --now "$path" && say "enabled $path again"; fi ;;
    esac
  done
  # What the agent itself wrote beside its settings: frpc's main file and include files.
  files+=(/etc/qudata/frpc.toml)
  for p in "$(at /etc/qudata/frpc.d)"/*.toml; do
    [ -e "$p" ] && files+=("${p#"${ROOT%/}"}")
  done
  [ -d "$(at /etc/qudata/frpc.d)" ] && dirs+=(/etc/qudata/frpc.d)
  for p in "${files[@]}"; do
    [ -e "$(at "$p")" ] || [ -L "$(at "$p")" ] || continue
    if dry; then say "would remove $p"; else rm -f -- "$(at "$p")" && say "removed $p"; fi
  done
  # Deepest first; only when empty (something else may have been put there since).
  for p in $(printf '%s\n' "${dirs[@]}" | awk '{ print gsub("/", "/") "\t" $0 }' | sort -rn | cut -f2-); do
    if dry; then say "would remove the directory $p if empty"; else rmdir -- "$(at "$p")" 2>/dev/null && say "removed $p"; fi
  done
  [ "$grub" = 1 ] && regenerate_grub
  return_boot_gpus
  if [ "$purge" = 1 ]; then
    for p in /var/lib/qudata /var/cache/qudata; do
      [ -e "$(at "$p")" ] || continue
      if dry; then say "would remove $p (--purge)"; else rm -rf -- "$(at "$p")" && say "removed $p (--purge)"; fi
    done
    for p in /var/lib /var; do
      dry || rmdir -- "$(at "$p")" 2>/dev/null || true
    done
  elif ! dry; then
    rm -rf -- "$(at "$BACKUP")"
    rm -f -- "$(at "$PENDING")" "$manifest"
    say "kept /var/lib/qudata (images and the agent's identity); --purge removes it"
  fi
  if dry; then say "dry run: nothing was changed"; else say "uninstalled"; fi
}

# The GPUs the boot configuration put on vfio-pci go back to a host driver now that the
# configuration is gone (recover --stop-all already returned those the agent had bound):
# driver_override cleared, unbound from vfio-pci, probed again, each with a deadline. The
# host's only, or a sysfs named by INSTALL_SYSFS_ROOT.
return_boot_gpus() {
  local dev addr fn driver waited
  if [ "$ROOT" != / ] && [ -z "${INSTALL_SYSFS_ROOT:-}" ]; then return 0; fi
  while read -r addr _; do
    [ -n "$addr" ] || continue
    for dev in "$(sysfs)/bus/pci/devices/${addr%.*}".*; do
      [ "$(<"$dev/vendor")" = 0x10de ] || continue
      fn=$(basename "$dev")
      driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
      [ "$driver" = vfio-pci ] || continue
      if dry; then say "would give $fn back to its host driver"; continue; fi
      [ "$ROOT" = / ] && modprobe -q nvidia 2>/dev/null
      if ! { sysfs_write $'\n' "$dev/driver_override" && sysfs_write "$fn" "$dev/driver/unbind" &&
        sysfs_write "$fn" "$(sysfs)/bus/pci/drivers_probe"; }; then
        say "WARNING: cannot give $fn back to a host driver (a sysfs write failed or hung)" >&2
        continue
      fi
      for waited in $(seq 1 100); do
        driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null)
        [ -n "$driver" ] && [ "$driver" != vfio-pci ] && break
        sleep 0.1
      done
      say "gave $fn back to a host driver: ${driver:-none took it} (${waited} polls)"
    done
  done <<<"$(nvidia_gpus)"
}

# sysfs_write VALUE FILE: one write with a deadline (a hung driver can block it for ever).
# shellcheck disable=SC2016 # the inner shell expands $1 and $2, its own arguments
sysfs_write() { timeout 15 bash -c 'printf "%s" "$1" >"$2"' _ "$1" "$2"; }

# The agent stopped (so it does not start anything again), then every instance and frpc
# stopped and the GPUs returned, by the agent's own recover. The host's only: not under --root.
stop_everything() {
  local agent; agent=$(at /usr/local/bin/qudata-agent)
  if [ "$ROOT" != / ]; then say "skip: stopping the agent and its instances (installing into $ROOT)"; return 0; fi
  if dry; then say "would stop $UNIT and run: qudata-agent recover --stop-all"; return 0; fi
  if [ -d /run/systemd/system ] && systemctl cat "$UNIT" >/dev/null 2>&1; then
    systemctl disable --now "$UNIT" || die "cannot stop $UNIT: journalctl -u $UNIT"
    systemctl disable "$FINISH_UNIT" >/dev/null 2>&1 || true
  fi
  if [ -x "$agent" ]; then
    # The unit's settings (data and run dirs) apply to recover too; read as data, never run,
    # and without the secrets recover does not need.
    local line settings=()
    if [ -f /etc/qudata/agent.env ]; then
      while IFS= read -r line; do
        [[ $line =~ ^(QUDATA_[A-Z0-9_]+)=(.*)$ ]] || continue
        case ${BASH_REMATCH[1]} in QUDATA_API_KEY|QUDATA_FRP_TOKEN) continue ;; esac
        settings+=("$line")
      done </etc/qudata/agent.env
    fi
    # export is a builtin: the values never reach a process's argv.
    (for line in "${settings[@]}"; do export "${line?}"; done; exec "$agent" recover --stop-all) ||
      die "qudata-agent recover --stop-all failed (see above); nothing was removed"
  fi
}

remove_user() {
  if [ "$ROOT" != / ]; then return 0; fi
  getent passwd "$1" >/dev/null || return 0
  if dry; then say "would remove the system user $1"; return 0; fi
  userdel "$1" && say "removed the system user $1"
}

for arg in "$@"; do
  if [ "$arg" = --uninstall ]; then uninstall "$@"; exit 0; fi
  if [ "$arg" = --finish ]; then finish_after_reboot "$@"; exit 0; fi
done

case "${1:-}" in
  --local)
    mapfile -t builder_pkgs < <(packages_in image-builder/packages.txt)
    install_packages "${LOCAL_PKGS[@]}" "${builder_pkgs[@]}"
    build_agent
    prepare_local_image
    exec ./target/release/qudata-agent run --local
    ;;
  --packages)
    [ -n "${2:-}" ] || usage 2 >&2
    mapfile -t pkgs < <(packages_in "$2")
    install_packages "${pkgs[@]}"
    # The tests run their own registry on 127.0.0.1; the package's service would listen on
    # every interface of this machine.
    if [[ " ${pkgs[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null &&
      systemctl is-enabled --quiet docker-registry 2>/dev/null; then
      systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
    ;;
  -h|--help) usage 0 ;;
  *) production "$@" ;;
esac
