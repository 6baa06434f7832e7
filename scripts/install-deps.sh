#!/usr/bin/env bash
# Installs what rbee-hive needs on a fresh Debian 12 machine (as root), and
# does nothing when it is all there already.
#
#   install-deps.sh run    what `make run` needs: the Go modules (the hive and
#                          its demo worker need no other package)
#   install-deps.sh test   also what `make test` needs: qemu and busybox for
#                          the cgroup v2 VM, Prometheus/promtool, journald and
#                          the systemd tools, a C compiler, and staticcheck
#                          (pinned) into GOBIN. The default.
set -euo pipefail

set_name=${1:-test}
case "$set_name" in
  run|test) ;;
  *) echo "usage: $0 [run|test]" >&2; exit 2 ;;
esac

# staticcheck release 2026.2.2; the newest at the time of pinning, and the
# first that supports Go 1.26. Bump deliberately: new checks may fail lint.
STATICCHECK_VERSION=v0.8.2

if [ "$set_name" = test ]; then
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

  gobin=$(go env GOBIN)
  [ -n "$gobin" ] || gobin="$(go env GOPATH)/bin"
  if ! "$gobin/staticcheck" -version 2>/dev/null | grep -qF "(${STATICCHECK_VERSION#v})"; then
    echo "install-deps: go install honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION into $gobin"
    GOBIN="$gobin" go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
  fi
fi

go mod download
echo "install-deps: ok ($set_name)"
