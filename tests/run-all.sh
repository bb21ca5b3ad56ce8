#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine (as root) that has only the Rust
# toolchain: installs what is missing, then format check, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$1"); }
for pkg in $(cat tests/packages.txt | sed 's/#.*//'); do need "$pkg"; done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets -- --test-threads="${QUDATA_TEST_THREADS:-2}"
