#!/usr/bin/env bash
# Provisions a Debian 12 host for qudata-agent (as root).
#
#   ./install.sh --local   install what is missing, build the agent, run it in local mode
#   ./install.sh --packages FILE
#                          install the Debian packages listed in FILE (used by the tests)
#
# Local mode needs no control plane and no frpc: it builds the small CI guest (image-builder/)
# as its base image, and the agent prints a generated secret and example curl commands.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

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

# What local mode runs: QEMU with OVMF, the seed tools, an SSH client for the newcomer.
LOCAL_PKGS=(ca-certificates qemu-system-x86 qemu-utils ovmf dosfstools mtools openssh-client)

# Local mode boots the small CI guest; build it (cached, skipped when up to date) and make it
# the default base image unless one is already there.
prepare_local_image() {
  local data_dir="${QUDATA_DATA_DIR:-/var/lib/qudata}"
  local images="$data_dir/images"
  install -d -m 0700 "$data_dir"
  install -d -m 0700 "$images"
  image-builder/build-ci-guest.sh "$images" >/dev/null
  [ -e "$images/base.qcow2" ] || ln -s ci-guest.qcow2 "$images/base.qcow2"
}

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
    ;;
  -h|--help) usage 0 ;;
  *) usage 2 >&2 ;;
esac
