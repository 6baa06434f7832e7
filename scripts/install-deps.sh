#!/usr/bin/env bash
# Installs everything `make test` needs on a fresh Debian 12 machine (as root),
# and does nothing when it is all there already.
set -euo pipefail

# command → Debian package that provides it
declare -A need=(
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [promtool]=prometheus
  [prometheus]=prometheus
  [journalctl]=systemd
  [systemd-notify]=systemd
  [systemd-analyze]=systemd
  [systemd-socket-activate]=systemd
  [perl]=perl-base
  [curl]=curl
  [cpio]=cpio
  [jq]=jq
  [xz]=xz-utils
  [gcc]=gcc
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
[ -x /lib/systemd/systemd-journald ] || missing+=(systemd)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to apt-get install: ${missing[*]}" >&2
    exit 1
  fi
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "install-deps: apt-get install $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends keeps qemu from pulling a desktop stack.
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  # The prometheus package starts a server on :9090 where systemd runs; we
  # only want its binaries.
  systemctl stop prometheus 2>/dev/null || true
fi

go mod download
echo "install-deps: ok"
