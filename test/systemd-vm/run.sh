#!/usr/bin/env bash
# Boots this host's systemd as PID 1 in a qemu VM (TCG, no disk image) and
# runs the shipped units as an operator would: `make install DESTDIR=` into
# the VM's writable layer, `systemctl start rbee-hive`, journalctl, and so
# on (test/systemd-vm/checks.sh). Recipe: the host's / read-only over 9p
# under a tmpfs overlay (test/systemd-vm/init.sh).
#
#   bash test/systemd-vm/run.sh        (make systemdtest)
#
# Every check prints `SDTEST <nonce> PASS|FAIL <name> <detail>` on the
# serial console. The run passes only if every name in EXPECTED passed
# exactly once and nothing failed; a missing line (a check that silently did
# not run, a VM that hung) fails it. A failed run keeps the serial log, the
# VM's journal (`journalctl -o export` and `-o json`) and the checks' output
# (checks.log) in a results directory, whose path is printed.
#
# Environment:
#   VMTEST_CACHE      kernel cache shared with test/vm/run.sh (default .cache/vm)
#   SDTEST_TIMEOUT    seconds for the whole VM run (default 480)
#   SDTEST_SCALE      multiplies every wait inside the guest (default 1;
#                     raise it on a slow or contended host)
#   SDTEST_MEM        VM memory in MiB (default 768)
#   SDTEST_SMP        VM CPUs (default 2)
#   SDTEST_RESULTS    where results directories go (default .cache/systemd-vm)
#   SDTEST_ONLY       run only these checks (space-separated names), for
#                     debugging one; the run then fails for the missing ones
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/test/systemd-vm
CACHE=${VMTEST_CACHE:-$ROOT/.cache/vm}
TIMEOUT=${SDTEST_TIMEOUT:-480}
SCALE=${SDTEST_SCALE:-1}
MEM=${SDTEST_MEM:-768}
SMP=${SDTEST_SMP:-2}
RESULTS=${SDTEST_RESULTS:-$ROOT/.cache/systemd-vm}
MAKE=${MAKE:-make}

# The checks, in the order checks.sh runs them. A new check is a function
# c_<name> (dashes become underscores) in checks.sh plus its name here.
EXPECTED=(
	start-ready status-line credential-token supervisor-leaf worker-cgroup
	hive-capbnd worker-privs file-roots journal-worker oom-continue journal-err instance-gpu1 watchdog-restart
	sigkill-restart stop-drain notify-socket security
)

log() { printf 'systemdtest: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

cd "$ROOT"
start=$(date +%s)
[ "$(id -u)" = 0 ] || die "needs root (make install into the VM's tree keeps root ownership)"
for c in qemu-system-x86_64 cpio busybox; do command -v $c >/dev/null || die "$c missing: run scripts/install-deps.sh"; done
[ -x /lib/systemd/systemd ] || die "no /lib/systemd/systemd on this host"

# --- kernel: the one test/vm/run.sh caches, plus its uncompressed vmlinux ----
mkdir -p "$CACHE"
kernel=$(ls "$CACHE"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
if [ -z "$kernel" ]; then
	# Same download as test/vm/run.sh, serialised: several checkouts share the cache.
	(
		flock 9
		if ! ls "$CACHE"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
			img=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
			if [ -z "$img" ]; then
				apt-get update -q >&2
				img=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
			fi
			[ -n "$img" ] || die "cannot resolve linux-image-amd64 to a kernel package"
			log "downloading $img"
			dl=$(mktemp -d "$CACHE/dl.XXXXXX")
			(cd "$dl" && apt-get download "$img" >&2)
			dpkg-deb -x "$dl"/*.deb "$CACHE/kernel.$$"
			rm -rf "$dl" "$CACHE/kernel"
			mv "$CACHE/kernel.$$" "$CACHE/kernel"
		fi
	) 9>"$CACHE/.lock"
	kernel=$(ls "$CACHE"/kernel/boot/vmlinuz-* | head -n1)
fi
kver=${kernel##*/vmlinuz-}
moddir=$CACHE/kernel/lib/modules/$kver/kernel
# qemu boots the ELF vmlinux through its PVH entry; under TCG that saves the
# guest ~6 s of decompressing the bzImage on every boot.
vmlinux=$CACHE/vmlinux-$kver
if [ ! -s "$vmlinux" ]; then
	for off in $(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$kernel" | cut -d: -f1); do
		tail -c +$((off + 1)) "$kernel" | xz -dcq 2>/dev/null >"$vmlinux.$$" || true # trailing data after the stream
		[ "$(head -c4 "$vmlinux.$$" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && break
	done
	[ "$(head -c4 "$vmlinux.$$" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { rm -f "$vmlinux.$$"; die "could not extract vmlinux from $kernel"; }
	mv -f "$vmlinux.$$" "$vmlinux"
fi

# --- build and install the hive as an operator would ---------------------------
log "building"
$MAKE -s build >&2 || die "make build"
work=$(mktemp -d "${TMPDIR:-/tmp}/systemdtest.XXXXXX")
trap 'rm -rf "$work"' EXIT
share=$work/share
mkdir -p "$share/install" "$share/test/root" "$share/out"
$MAKE -s install DESTDIR="$share/install" >"$work/install.log" 2>&1 || { cat "$work/install.log" >&2; die "make install"; }

nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
cat >"$share/test/sdtest.env" <<ENV
SDTEST_NONCE='$nonce'
ENV
bash "$HERE/stage.sh" "$share/test/root" "$nonce" "$SCALE" "${SDTEST_ONLY:-${EXPECTED[*]}}" $((TIMEOUT - 30)) || die "staging the test tree"

# --- initramfs: busybox, init.sh and the modules for 9p and overlayfs ---------
initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,modules}
cp /bin/busybox "$initrd/bin/busybox"
cp "$HERE/init.sh" "$initrd/init"
chmod 755 "$initrd/init"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
	drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/9p/9pnet net/9p/9pnet_virtio \
	fs/netfs/netfs fs/fscache/fscache fs/9p/9p fs/overlayfs/overlay; do
	f=$(ls "$moddir/$m".ko* | head -n1)
	case $f in
	*.xz) xz -dc "$f" >"$initrd/modules/$(basename "$m").ko" ;;
	*.zst) zstd -dcq "$f" >"$initrd/modules/$(basename "$m").ko" ;;
	*) cp "$f" "$initrd/modules/" ;;
	esac
done
(cd "$initrd" && find . -print0 | cpio --null -o -H newc --quiet) >"$work/initrd.cpio"
log "prepared in $(($(date +%s) - start)) s (kernel $kver)"

# --- boot ------------------------------------------------------------------
serial=$work/serial.log
boot=$(date +%s)
set +e
timeout --foreground "$TIMEOUT" qemu-system-x86_64 \
	-machine q35 -accel tcg,tb-size=128 -cpu max -smp "$SMP" -m "$MEM" \
	-kernel "$vmlinux" -initrd "$work/initrd.cpio" \
	-append "console=ttyS0 rdinit=/init quiet loglevel=3 panic=-1 systemd.unit=multi-user.target systemd.unified_cgroup_hierarchy=1 systemd.show_status=error clocksource=tsc tsc=reliable" \
	-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
	-virtfs local,path="$share",mount_tag=sdshare,security_model=none,multidevs=remap \
	-nic none -display none -monitor none -serial stdio -no-reboot </dev/null |
	sed -u 's/\r$//' | tee "$serial" | grep -a --line-buffered "SDTEST" >&2
qrc=${PIPESTATUS[0]}
set -e
vm_s=$(($(date +%s) - boot))

# --- verdict ---------------------------------------------------------------------
fail=0
grep -aq "^SDTEST-INIT-$nonce" "$serial" || { log "the VM never reached init.sh (qemu exit $qrc)"; fail=1; }
for name in "${EXPECTED[@]}"; do
	n=$(grep -ac "^SDTEST $nonce PASS $name\( \|\$\)" "$serial" || true)
	if [ "$n" != 1 ]; then
		grep -aq "^SDTEST $nonce FAIL $name\( \|\$\)" "$serial" || log "$name: no result"
		fail=1
	fi
done
if grep -a "^SDTEST $nonce FAIL " "$serial" >&2; then fail=1; fi
unknown=$(grep -a "^SDTEST $nonce \(PASS\|FAIL\) " "$serial" | awk '{print $4}' | sort | uniq -c | awk '$1 != 1 {print $2}' || true)
[ -z "$unknown" ] || { log "checks reported more than once: $unknown"; fail=1; }
grep -aq "^SDTEST $nonce DONE" "$serial" || { log "the runner did not finish (VM timed out after ${TIMEOUT}s or crashed; qemu exit $qrc)"; fail=1; }
passed=$(grep -ac "^SDTEST $nonce PASS " "$serial" || true)
uptime=$(sed -n "s/^SDTEST $nonce DONE .*uptime=\([0-9.]*\).*/\1/p" "$serial")
booted=$(sed -n "s/^SDTEST $nonce BOOTED .*uptime=\([0-9.]*\).*/\1/p" "$serial")
exposure=$(sed -n "s/^SDTEST $nonce PASS security \(.*\)/\1/p" "$serial")

mkdir -p "$RESULTS"
res=$RESULTS/run-$(date -u +%Y%m%dT%H%M%SZ)-$nonce
mkdir -p "$res"
cp "$serial" "$res/serial.log"
cp -r "$share/out/." "$res/" 2>/dev/null || true
summary="checks $passed/${#EXPECTED[@]} passed; guest ready for checks at ${booted:-?} s uptime, done at ${uptime:-?} s; VM wall ${vm_s} s; total $(($(date +%s) - start)) s; security: ${exposure:-?}"
echo "$summary" >"$res/summary.txt"
log "$summary"
if [ "$fail" != 0 ]; then
	log "FAILED; serial log, the VM's journal and the checks' output kept in $res"
	log "(journal.json for jq; journal.export: systemd-journal-remote -o x.journal journal.export, then journalctl --file x.journal)"
	exit 1
fi
# A passing run keeps only its summary and serial log.
rm -f "$res/journal.export" "$res/journal.json"
log "ok ($res)"
