#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine (as root) that has only the Rust
# toolchain: installs what is missing, then format check, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

./install.sh --packages tests/packages.txt

# The production guest image (tests/it/production_vm.rs, guest_image.rs) takes minutes to build
# from Debian packages; it builds beside the format check, lints and compilation, and the
# tests find it up to date (the builder's lock makes an early test wait for it).
mkdir -p target/tmp/ci-guest
image-builder/build-guest.sh --no-nvidia --out target/tmp/ci-guest/guest.qcow2 \
  >target/tmp/build-guest.log 2>&1 &
image_build=$!

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
# The tests write the agents' logs and every secret the mock control plane issued under here;
# start empty so the scan below covers exactly this run.
scratch="target/tmp"
rm -rf "$scratch/agent-logs" "$scratch/issued-secrets" "$scratch/issued-secrets.scan"
# --no-fail-fast: a failure in one test target (the unit tests, tests/it, a bench in test mode)
# still lets the others run and report.
cargo test --locked --all-targets --no-fail-fast -- --test-threads="${QUDATA_TEST_THREADS:-2}"
# The tests that need the image waited for it (and built it again, with the builder's words in
# their failure, had it failed here).
wait "$image_build" || echo "note: the background image build failed: target/tmp/build-guest.log" >&2

echo "== no secret in any agent log"
# Values shorter than 8 characters cannot be credentials and would match by accident.
secrets="$scratch/issued-secrets.scan"
[ -s "$scratch/issued-secrets" ] && awk 'length($0) >= 8' "$scratch/issued-secrets" | sort -u >"$secrets"
if [ -s "$secrets" ] && [ -d "$scratch/agent-logs" ]; then
  if grep -rF -f "$secrets" "$scratch/agent-logs" >/dev/null; then
    echo "a secret issued by the mock control plane appears in an agent log:" >&2
    grep -rlF -f "$secrets" "$scratch/agent-logs" >&2
    exit 1
  fi
  echo "$(wc -l <"$secrets") secrets checked against $(find "$scratch/agent-logs" -type f | wc -l) logs"
else
  echo "no secrets were issued or no logs were written: the scan cannot run" >&2
  exit 1
fi
