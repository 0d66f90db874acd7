#!/usr/bin/env bash
# Runs lockhook's whole test suite: unit, process-level, install and end-to-end tests against a
# real libvirtd + QEMU that the tests start in private namespaces (never the host's libvirtd).
# Needs root. Installs what is missing first: Debian packages (apt-get), cargo-nextest and cargo-deb.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "$(id -u)" = 0 ] || { echo "tests/run-all.sh: run as root (the end-to-end tests start libvirtd and QEMU)" >&2; exit 1; }

need_apt=0
for cmd in libvirtd virtlogd virsh qemu-system-x86_64 qemu-img unshare nsenter losetup partx sfdisk parted sanlock cc; do
  command -v "$cmd" >/dev/null || need_apt=1
done
[ -x /usr/bin/python3 ] || need_apt=1 # a non-root socket client in the hardening tests
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need_apt=1 # UEFI guests in the storage tests
# The sanlock tests: private daemons (sanlock), the client library lockhook dlopens (libsanlock1),
# and cc for the daemon's test-only setrlimit shim (gcc).
ldconfig -p | grep -F 'libsanlock_client.so.1 ' >/dev/null || need_apt=1
# libvirt's own sanlock driver, for the interoperability tests of the sanlock engine.
[ -f /usr/lib/x86_64-linux-gnu/libvirt/lock-driver/sanlock.so ] || need_apt=1
command -v man >/dev/null || need_apt=1 # the install test renders the man pages (man -l)
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || need_apt=1 # its parser checks `lockhook metrics`
if [ "$need_apt" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # qemu-utils must come from the same QEMU release as qemu-system-x86: some images ship a
  # newer (backports) qemu-utils whose Breaks: stop the install otherwise.
  qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  apt-get install -y -qq --no-install-recommends --allow-downgrades \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 \
    "qemu-utils=${qemu_version}" util-linux mount python3-minimal fdisk parted ovmf \
    sanlock libsanlock1 libvirt-sanlock gcc libc6-dev man-db python3-prometheus-client >/dev/null
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# The Debian package tests build the package with cargo-deb (about a minute to install).
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb

cargo fmt --all -- --check
# Tests that need root or a libvirtd are #[ignore]d for a plain `cargo test`; run them all here.
cargo nextest run --locked --no-fail-fast --run-ignored all "$@"
