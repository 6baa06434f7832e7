#!/usr/bin/env bash
# Finds the capabilities the hive needs: runs bench/capprobe (the hive's
# privileged operations on an isolated worker) with the full set, with the
# proposed bounding set, and with that set minus one capability at a time.
# Run as root on the host (cgroup v1 or v2). Output: one block per set.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(mktemp -d)/capprobe
go build -o "$bin" ./bench/capprobe
trap 'rm -f "$bin"; find /sys/fs/cgroup -mindepth 1 -maxdepth 8 -depth -type d -path "*rbee-capprobe-*" -exec rmdir {} + 2>/dev/null || true' EXIT
# Readable by the worker uid (the probe starts /bin/sleep, not itself).
chmod 755 "$(dirname "$bin")"

proposed=(setuid setgid setpcap kill sys_ptrace chown dac_override)
run() {
	echo "== $1"
	setpriv --bounding-set="$2" --inh-caps=-all -- "$bin" || true
}
run "full" "+all"
set=$(printf -- '-all'; printf ',+%s' "${proposed[@]}")
run "proposed: ${proposed[*]}" "$set"
for c in "${proposed[@]}"; do
	run "proposed minus $c" "${set/,+$c/}"
done
# CAP_DAC_READ_SEARCH instead of CAP_DAC_OVERRIDE: enough to look into a
# worker's /proc/<pid>/fd, not to empty its home.
run "proposed with dac_read_search for dac_override" "${set/,+dac_override/,+dac_read_search}"
