#!/usr/bin/env bash
# Provisions a Debian 12 host for qudata-agent (as root).
#
#   ./install.sh --local   install what is missing, build the agent, run it in local mode
#
# Local mode needs no control plane and no frpc: the agent prints a generated secret and an
# example curl, and serves its API on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

install_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "install.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build_agent() {
  command -v cargo >/dev/null || { echo "install.sh: cargo (Rust 1.95) is required" >&2; exit 1; }
  cargo build --release --locked
}

case "${1:-}" in
  --local)
    install_packages ca-certificates
    build_agent
    exec ./target/release/qudata-agent run --local
    ;;
  -h|--help) usage 0 ;;
  *) usage 2 >&2 ;;
esac
