#!/usr/bin/env bash
# Makes the release artefact that install.sh downloads (INSTALL_RELEASE_URL):
#
#   scripts/dist.sh [--out DIR] [--binary PATH]
#
# DIR (default target/dist) receives
#   qudata-agent-x86_64-linux.tar.gz         the artefact
#   qudata-agent-x86_64-linux.tar.gz.sha256  its SHA-256, as `sha256sum` prints it
# The tarball holds one directory, qudata-agent/, with
#   qudata-agent                      the agent (release build, --locked, debug info stripped)
#   install.sh                        the installer (also the one-line install's script)
#   systemd/qudata-agent.service      the unit
#   grub/qudata-iommu.cfg             the IOMMU kernel command-line drop-in
#   image-builder/                    the guest image builders
#   VERSION                           the crate version
#   SHA256SUMS                        the SHA-256 of every file above
# --binary PATH packs an agent already built instead of building one (the tests use it).
# The archive is reproducible: sorted names, owner 0, mode as in git, and every mtime set to
# the last commit's time (SOURCE_DATE_EPOCH when set).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/dist
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dist.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$binary" ]; then
  cargo build --release --locked
  binary=target/release/qudata-agent
fi
[ -x "$binary" ] || { echo "dist.sh: $binary is not an executable" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
name=qudata-agent-x86_64-linux.tar.gz

stage=$(mktemp -d)
trap 'rm -rf -- "$stage"' EXIT
top="$stage/qudata-agent"
mkdir -p "$top/systemd" "$top/grub"
install -m 0755 "$binary" "$top/qudata-agent"
# Debug info stays with the build (symbols for backtraces stay in the binary).
strip --strip-debug "$top/qudata-agent"
install -m 0755 install.sh "$top/install.sh"
install -m 0644 systemd/qudata-agent.service "$top/systemd/"
install -m 0644 grub/qudata-iommu.cfg "$top/grub/"
# The builders as git has them (no caches or outputs of earlier builds).
git ls-files -z image-builder | while IFS= read -r -d '' f; do
  install -D -m "$( [ -x "$f" ] && echo 0755 || echo 0644 )" "$f" "$top/$f"
done
printf '%s\n' "$version" >"$top/VERSION"
sums="$stage/SHA256SUMS"
(cd "$top" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum >"$sums")
mv "$sums" "$top/SHA256SUMS"

mkdir -p "$out"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$stage" -cf - qudata-agent | gzip -n -6 >"$out/$name.part"
mv -f "$out/$name.part" "$out/$name"
(cd "$out" && sha256sum "$name" >"$name.sha256")
echo "dist.sh: $out/$name ($(stat -c %s "$out/$name") bytes, version $version)"
