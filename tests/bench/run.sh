#!/usr/bin/env bash
# lockhook's benchmark (issue 5): lockhook against no hook, a no-op hook and virtlockd, on private
# libvirtds that it starts in their own namespaces (never the host's libvirtd). Needs root.
# Installs what is missing (Debian packages), builds lockhook in release mode, then runs
# `cargo bench --bench lockhook`. Prints a markdown table and puts it on top of the earlier runs in
# tests/bench/last-result.md (this run alone: target/bench/last-run.md).
#
#   sudo tests/bench/run.sh            # full run, ~25 min plus the build (part 6 runs 500 guests)
#   sudo tests/bench/run.sh --quick    # smoke run, ~4 min
#   sudo tests/bench/run.sh --rounds 25 --parallel-rounds 12 --hook-rounds 80 --parts 1,2,3,4
#   sudo tests/bench/run.sh --parts 3,5,6 --held 0,1000,2000 --churn 1000 --storm 300
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

[ "$(id -u)" = 0 ] || { echo "tests/bench/run.sh: run as root (it starts libvirtd, virtlockd and QEMU)" >&2; exit 1; }

# sudo's secure_path usually lacks ~/.cargo/bin: find cargo (root's, else the invoking user's).
if ! command -v cargo >/dev/null; then
  for home in "$HOME" /root "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
    if [ -x "$home/.cargo/bin/cargo" ]; then
      export PATH="$home/.cargo/bin:$PATH"
      [ -d "$home/.rustup" ] && export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
      export CARGO_HOME="${CARGO_HOME:-$home/.cargo}"
      break
    fi
  done
fi
command -v cargo >/dev/null || { echo "tests/bench/run.sh: cargo not found (install rustup)" >&2; exit 1; }

need_apt=0
for cmd in libvirtd virtlogd virtlockd virsh qemu-system-x86_64 unshare nsenter; do
  command -v "$cmd" >/dev/null || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 util-linux mount >/dev/null
fi

# The binary install.sh installs: statically linked where the toolchain can.
host=$(rustc -vV | sed -n 's/^host: //p')
built=target/release/lockhook
case "$host" in
  *-linux-gnu)
    if RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" cargo build --release --locked --target "$host"; then
      built="target/$host/release/lockhook"
    else
      cargo build --release --locked
    fi ;;
  *) cargo build --release --locked ;;
esac
# Measure exactly this release build: `cargo bench` re-links target/release/lockhook with the bench
# profile, and another build could replace it during the run.
mkdir -p target/bench
# (cp + mv: a holder still running from an earlier run keeps the old file busy.)
cp "$built" target/bench/lockhook.new
mv -f target/bench/lockhook.new target/bench/lockhook
export LOCKHOOK_BENCH_BIN="$PWD/target/bench/lockhook"
exec cargo bench --locked --bench lockhook -- "$@"
