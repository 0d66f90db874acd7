#!/usr/bin/env bash
# Builds the Debian package target/debian/lockhook_<version>-1_<arch>.deb with cargo-deb
# (`cargo install --locked cargo-deb`); metadata in Cargo.toml [package.metadata.deb], maintainer
# scripts beside this file. Needs no root.
#
#   ./debian/build.sh [cargo deb options]     e.g. --deb-version 0.2.0-2, --output DIR
#
# cargo-deb packages files that exist at build time, so this builds the binary first (statically
# linked where the toolchain can, as install.sh does), then has it write its man pages and
# completions into target/deb-assets, with the systemd units from hooks/ pointed at
# /usr/sbin/lockhook, and packages all of it (`cargo deb --no-build`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo-deb >/dev/null || { echo "debian/build.sh: needs cargo-deb: cargo install --locked cargo-deb" >&2; exit 1; }

# A hook and a holder are exec'd on every guest start; a static binary starts without the dynamic
# loader (see install.sh).
host=$(rustc -vV | sed -n 's/^host: //p')
target=()
case "$host" in
  *-linux-gnu)
    if RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --quiet --target "$host"; then
      target=(--target "$host")
    else
      echo "debian/build.sh: static build failed; building a dynamically linked binary" >&2
    fi ;;
esac
if [ "${#target[@]}" = 0 ]; then
  cargo build --release --locked --quiet
  bin=target/release/lockhook
else
  bin=target/$host/release/lockhook
fi

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/units"
"$bin" generate man "$assets/man8" >/dev/null
"$bin" generate completions "$assets/completions" >/dev/null
for unit in lockhook-reconcile.service lockhook-reconcile.timer lockhook-sanlock-join.service; do
  sed 's|/usr/local/sbin/lockhook|/usr/sbin/lockhook|g' "hooks/$unit" >"$assets/units/$unit"
done

# The package goes to target/debian/ also when built for an explicit --target (unless --output).
output=(--output target/debian/)
for arg in "$@"; do
  case "$arg" in -o|--output|--output=*) output=() ;; esac
done
mkdir -p target/debian
exec cargo deb --no-build --locked "${target[@]}" "${output[@]}" "$@"
