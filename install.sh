#!/usr/bin/env bash
# Builds, installs and activates lockhook as libvirt's qemu hook. Idempotent.
#
#   sudo ./install.sh                 build (release) and install, then make libvirt notice the hook
#   sudo ./install.sh --uninstall     remove the binary and the hook (config and lockspace are kept)
#   sudo ./install.sh --binary PATH   install a binary built elsewhere instead of building
#
# Layout (see hooks/README.md):
#   /usr/local/sbin/lockhook              the binary (LOCKHOOK_BIN to change)
#   /etc/libvirt/hooks/qemu               symlink to it, when no other qemu hook exists
#   /etc/libvirt/hooks/qemu.d/50-lockhook symlink to it, when an administrator's qemu hook exists
#   /etc/lockhook/lockhook.toml           the config, installed only if there is none
#   /run/lockhook, /var/lib/lockhook      run and lockspace directories
#   /etc/systemd/system/lockhook-reconcile.{service,timer}   when systemd runs: reconcile every minute
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${LOCKHOOK_BIN:-/usr/local/sbin/lockhook}
hooks=${LIBVIRT_HOOKS_DIR:-/etc/libvirt/hooks}
conf=/etc/lockhook/lockhook.toml
qemud="$hooks/qemu.d/50-lockhook"
mode=install
prebuilt=""

say() { printf 'lockhook install: %s\n' "$*"; }
die() { printf 'lockhook install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) mode=uninstall ;;
    --binary) prebuilt=${2:?--binary needs a path}; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"

# Whether $1 is a symlink to our binary.
points_to_us() { [ -L "$1" ] && [ "$(readlink -f "$1")" = "$(readlink -f "$bin")" ]; }

# libvirt finds hooks only when it starts or on SIGHUP. Signal the daemons of *this* mount
# namespace only (never, say, a test libvirtd in a private namespace).
notify_libvirt() {
  local found=0 self_ns pid name
  self_ns=$(readlink /proc/self/ns/mnt)
  for name in libvirtd virtqemud; do
    for pid in $(pgrep -x "$name" 2>/dev/null || true); do
      [ "$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" = "$self_ns" ] || continue
      found=1
      if [ -d /run/systemd/system ] && systemctl is-active --quiet "$name.service" 2>/dev/null; then
        systemctl reload "$name.service" && say "reloaded $name.service (SIGHUP) so it rescans its hooks"
      else
        kill -HUP "$pid" && say "sent SIGHUP to $name (pid $pid) so it rescans its hooks"
      fi
      # For `lockhook doctor`: when this daemon was told to rescan its hooks.
      [ -d /run/lockhook ] && touch "/run/lockhook/hup.$pid"
    done
  done
  if [ "$found" = 0 ]; then
    say "libvirtd/virtqemud is not running; it will find the hook when it starts"
  fi
}

warn_lockd() {
  local qconf=/etc/libvirt/qemu.conf
  if [ -f "$qconf" ] && grep -Eq '^[[:space:]]*lock_manager[[:space:]]*=[[:space:]]*"(lockd|sanlock)"' "$qconf"; then
    say "WARNING: $qconf sets lock_manager to lockd/sanlock; with lockhook, set it back to \"nop\" (both lock byte 0 of each image)"
  fi
}

install_binary() {
  local src=$1 tmp
  mkdir -p "$(dirname "$bin")"
  # Copy then rename: a running hook or holder keeps its old binary, nobody sees a half-written one.
  tmp=$(mktemp "$(dirname "$bin")/.lockhook.XXXXXX")
  cp "$src" "$tmp"
  chmod 0755 "$tmp"
  chown root:root "$tmp"
  mv -f "$tmp" "$bin"
  say "installed $bin"
}

install_hook() {
  mkdir -p "$hooks"
  if [ -e "$hooks/qemu" ] || [ -L "$hooks/qemu" ]; then
    if points_to_us "$hooks/qemu"; then
      say "hook $hooks/qemu already points to $bin"
      return
    fi
    # An administrator's own hook: keep it; libvirt (6.5+) runs qemu.d/* after it.
    mkdir -p "$hooks/qemu.d"
    ln -sfn "$bin" "$qemud"
    say "kept the existing $hooks/qemu; installed $qemud"
  else
    ln -sfn "$bin" "$hooks/qemu"
    say "installed hook $hooks/qemu -> $bin"
  fi
}

install_config() {
  mkdir -p "$(dirname "$conf")"
  if [ -e "$conf" ]; then
    say "kept the existing $conf"
  else
    install -m 0644 -o root -g root "$here/conf/lockhook.toml" "$conf"
    say "installed $conf (defaults)"
  fi
}

units="lockhook-reconcile.service lockhook-reconcile.timer"
unit_dir=/etc/systemd/system
has_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

install_units() {
  has_systemd || { say "systemd is not running: run 'lockhook reconcile' from cron if you want it periodically"; return; }
  local u
  for u in $units; do
    install -m 0644 "$here/hooks/$u" "$unit_dir/$u"
    sed -i "s|/usr/local/sbin/lockhook|$bin|" "$unit_dir/$u"
  done
  systemctl daemon-reload
  systemctl enable --now lockhook-reconcile.timer >/dev/null 2>&1 && say "enabled lockhook-reconcile.timer"
}

remove_units() {
  has_systemd || return 0
  local u removed=0
  for u in $units; do
    [ -e "$unit_dir/$u" ] || continue
    systemctl disable --now "$u" >/dev/null 2>&1 || true
    rm -f "$unit_dir/$u"
    removed=1
  done
  [ "$removed" = 0 ] || { systemctl daemon-reload; say "removed the reconcile timer"; }
}

if [ "$mode" = uninstall ]; then
  remove_units
  if points_to_us "$hooks/qemu"; then rm -f "$hooks/qemu"; say "removed $hooks/qemu"; fi
  if points_to_us "$qemud"; then rm -f "$qemud"; say "removed $qemud"; fi
  if [ -x "$bin" ]; then
    running=$(find /run/lockhook -maxdepth 1 -name '*.json' 2>/dev/null | wc -l)
    [ "$running" = 0 ] || say "note: $running guest(s) still hold locks; their holders let go when the guests stop"
  fi
  if [ -e "$bin" ]; then rm -f "$bin"; say "removed $bin"; fi
  # The idle spare holder (it holds no lock) goes too.
  pkill -f '^lockhook holder --config .* --spare$' 2>/dev/null && say "stopped the spare holder" || true
  notify_libvirt
  say "kept $conf and /var/lib/lockhook (remove them by hand if you want)"
  exit 0
fi

if [ -n "$prebuilt" ]; then
  [ -x "$prebuilt" ] || die "$prebuilt is not an executable"
  src=$prebuilt
else
  command -v cargo >/dev/null || die "cargo is needed to build lockhook (https://rustup.rs)"
  # Statically linked where the toolchain can: a hook and a holder are exec'd on every guest
  # start, and a static binary starts without the dynamic loader (about 0.3 ms each here).
  host=$(rustc -vV | sed -n 's/^host: //p')
  case "$host" in
    *-linux-gnu)
      if (cd "$here" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
            cargo build --release --locked --quiet --target "$host"); then
        src="$here/target/$host/release/lockhook"
      else
        say "static build failed; building a dynamically linked binary"
        (cd "$here" && cargo build --release --locked --quiet)
        src="$here/target/release/lockhook"
      fi ;;
    *)
      (cd "$here" && cargo build --release --locked --quiet)
      src="$here/target/release/lockhook" ;;
  esac
fi
install_binary "$src"
install_config
install -d -m 0700 -o root -g root /run/lockhook
install -d -m 0755 -o root -g root /var/lib/lockhook
install_hook
install_units
warn_lockd
"$bin" --config "$conf" status >/dev/null || die "the installed binary cannot read $conf"
notify_libvirt
say "done: the next guest start is protected; 'lockhook status' shows what is held"
