#!/usr/bin/env bash
# Runs Go test packages on cgroup v2 inside a qemu VM (TCG, no KVM needed):
# Debian's stock kernel plus a busybox initramfs, no disk.
#
#   bash test/vm/run.sh ./cgroup ./supervisor      (make vmtest)
#
# Needs root for apt-get the first time (qemu-system-x86, busybox-static,
# cpio); the kernel comes from `apt-get download` of Debian's
# linux-image-amd64 and is unpacked into .cache/vm (gitignored).
# Exits non-zero if a test binary fails, a test is skipped (the v2 suite must
# run in full; VMTEST_ALLOW_SKIP=1 relaxes that), or the VM does not report.
#
# Environment:
#   VMTEST_ARGS          extra flags for every test binary, e.g.
#                        "-test.run=^$ -test.bench=. -test.benchtime=20x"
#   VMTEST_TIMEOUT       seconds for the whole VM run (default 240 x scale)
#   VMTEST_TEST_TIMEOUT  -test.timeout per binary (default 180s x scale)
#   VMTEST_SCALE         integer multiplier of both defaults (default: from
#                        the load: 1 + load average / CPUs, rounded down,
#                        at most 5;
#                        the VM is emulated, so a loaded host slows it down)
#   VMTEST_MEM           VM memory in MiB (default 1536)
#   VMTEST_SMP           VM CPUs (default 2)
#   VMTEST_ALLOW_SKIP    1: do not fail on skipped tests
#   VMTEST_ACCEL         qemu accelerator (default tcg)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${VMTEST_CACHE:-$ROOT/.cache/vm}
# TCG emulation runs at what the host's CPUs have to spare: under a load
# average of 6 on 2 CPUs the suite needs about four times as long.
if [ -z "${VMTEST_SCALE:-}" ]; then
	# Capped at 5 (20 minutes in all), so a hung VM still fails CI in time.
	VMTEST_SCALE=$(awk -v n="$(nproc)" '{s = int(1 + $1 / n); print (s < 1 ? 1 : (s > 5 ? 5 : s))}' /proc/loadavg)
fi
case $VMTEST_SCALE in '' | *[!0-9]* | 0) echo "vmtest: VMTEST_SCALE=$VMTEST_SCALE: want a positive integer" >&2; exit 1 ;; esac
TIMEOUT=${VMTEST_TIMEOUT:-$((240 * VMTEST_SCALE))}
TEST_TIMEOUT=${VMTEST_TEST_TIMEOUT:-$((180 * VMTEST_SCALE))s}
MEM=${VMTEST_MEM:-1536}
SMP=${VMTEST_SMP:-2}
ARGS=${VMTEST_ARGS:-}
ALLOW_SKIP=${VMTEST_ALLOW_SKIP:-0}
GO=${GO:-go}

log() { printf 'vmtest: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ $# -gt 0 ] || set -- ./cgroup
cd "$ROOT"
start=$(date +%s)

# --- tools -----------------------------------------------------------------
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
if [ ${#need_pkgs[@]} -gt 0 ]; then
	log "installing ${need_pkgs[*]}"
	[ "$(id -u)" = 0 ] || die "need root to apt-get install ${need_pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2 ||
		{ apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2; }
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "busybox-static did not install $BUSYBOX"

# --- kernel (cached) ---------------------------------------------------------
mkdir -p "$CACHE"
kernel=$(ls "$CACHE"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
if [ -z "$kernel" ]; then
	# linux-image-amd64 is a metapackage: download the image it points at.
	img=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
	if [ -z "$img" ]; then
		apt-get update -q >&2
		img=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
	fi
	[ -n "$img" ] || die "cannot resolve linux-image-amd64 to a kernel package"
	log "downloading $img"
	rm -rf "$CACHE/dl" "$CACHE/kernel"
	mkdir -p "$CACHE/dl"
	(cd "$CACHE/dl" && apt-get download "$img" >&2)
	dpkg-deb -x "$CACHE"/dl/*.deb "$CACHE/kernel"
	rm -rf "$CACHE/dl"
	kernel=$(ls "$CACHE"/kernel/boot/vmlinuz-* | head -n1)
fi
log "kernel $kernel; load $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs: timeouts x$VMTEST_SCALE (${TEST_TIMEOUT} per binary, ${TIMEOUT}s in all)"

# --- initramfs -----------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/vmtest.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/root
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,run,etc,tests,pkg}
cp "$BUSYBOX" "$rootfs/bin/busybox"
cp test/vm/init.sh "$rootfs/init"
chmod 755 "$rootfs/init"

names=()
for pkg in "$@"; do
	name=$(basename "$pkg")
	log "building $pkg tests"
	CGO_ENABLED=0 $GO test -c -o "$rootfs/tests/$name.test" "$pkg" >&2 || die "go test -c $pkg"
	if [ ! -f "$rootfs/tests/$name.test" ]; then
		log "$pkg has no test files; nothing to run"
		continue
	fi
	mkdir -p "$rootfs/pkg/$name"
	[ -d "$pkg/testdata" ] && cp -r "$pkg/testdata" "$rootfs/pkg/$name/"
	names+=("$name")
done
[ ${#names[@]} -gt 0 ] || die "no test binaries to run"
if [ -d cmd/rbee-gate ]; then
	# Beside the test binaries, where the cgroup tests (no Go toolchain in the
	# VM) find it.
	log "building ./cmd/rbee-gate"
	CGO_ENABLED=0 $GO build -o "$rootfs/tests/rbee-gate" ./cmd/rbee-gate >&2 || die "build rbee-gate"
fi
if [ -d cmd/rbee-simworker ]; then
	log "building ./cmd/rbee-simworker"
	CGO_ENABLED=0 $GO build -o "$rootfs/bin/rbee-simworker" ./cmd/rbee-simworker >&2 || die "build rbee-simworker"
fi

nonce=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
cat >"$rootfs/etc/vmtest.env" <<ENV
VMTEST_NONCE='$nonce'
VMTEST_ARGS='$ARGS'
VMTEST_TEST_TIMEOUT='$TEST_TIMEOUT'
ENV
(cd "$rootfs" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$work/initrd.gz"
log "initramfs $(du -h "$work/initrd.gz" | cut -f1), built in $(($(date +%s) - start)) s"

# --- boot ------------------------------------------------------------------------
# The verdict reads this run's own log: concurrent runs (several checkouts
# or reviewers sharing .cache/vm) must not truncate each other's. The last
# run's log is copied to .cache/vm/serial.log for reading afterwards.
serial=$work/serial.log
# TCG by default: /dev/kvm may exist on these hosts without working (nested
# KVM aborts qemu with "failed to set MSR"). VMTEST_ACCEL=kvm opts in.
accel=${VMTEST_ACCEL:-tcg}
boot=$(date +%s)
set +e
timeout --foreground "$TIMEOUT" qemu-system-x86_64 \
	-machine q35,accel=$accel -cpu max -smp "$SMP" -m "$MEM" \
	-kernel "$kernel" -initrd "$work/initrd.gz" \
	-append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
	-display none -monitor none -serial stdio -no-reboot </dev/null |
	tr -d '\r' | tee "$serial"
qrc=${PIPESTATUS[0]}
set -e
cp "$serial" "$CACHE/serial.log.$$" && mv -f "$CACHE/serial.log.$$" "$CACHE/serial.log"
log "VM ran $(($(date +%s) - boot)) s (qemu exit $qrc, accel $accel); serial log $CACHE/serial.log"

# --- verdict ---------------------------------------------------------------------
grep -q "^VMTEST-BOOTED-$nonce" "$serial" || die "the VM did not boot into the test init (qemu exit $qrc)"
fail=0
for name in "${names[@]}"; do
	rc=$(sed -n "s/^VMTEST-RESULT-$nonce $name rc=\([0-9]*\)\$/\1/p" "$serial")
	section=$(awk -v b="VMTEST-BEGIN-$nonce $name" -v e="VMTEST-RESULT-$nonce $name " \
		'index($0,b)==1{on=1;next} index($0,e)==1{on=0} on' "$serial")
	if [ -z "$rc" ]; then
		log "$name: no result (VM timed out after ${TIMEOUT}s or crashed)"
		fail=1
		continue
	fi
	skips=$(printf '%s\n' "$section" | grep -E -- '--- SKIP' || true)
	if [ "$rc" != 0 ]; then
		log "$name: FAILED (exit $rc)"
		printf '%s\n' "$section" | grep -E -- '--- FAIL|panic:' >&2 || true
		fail=1
	elif [ -n "$skips" ] && [ "$ALLOW_SKIP" != 1 ]; then
		log "$name: tests were skipped inside the VM:"
		printf '%s\n' "$skips" >&2
		fail=1
	else
		log "$name: ok ($(printf '%s\n' "$section" | grep -c -- '--- PASS') passed)"
	fi
done
grep -q "^VMTEST-DONE-$nonce" "$serial" || { log "the VM did not finish the run"; fail=1; }
log "total $(($(date +%s) - start)) s"
exit $fail
