#!/usr/bin/env bash
# cgroup spawn and OOM benchmarks: on this host (v1 or v2, whatever New()
# picks) and on cgroup v2 inside the vmtest VM (TCG: absolute numbers are
# slow there, compare the ratios). Each benchmark measures its own bare
# exec.Command baseline in the same loop and reports leaf/bare.
#
#   bash bench/cgroup-bench.sh            # host + VM
#   BENCH_VM=0 bash bench/cgroup-bench.sh # host only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${BENCH_N:-50}
VM_N=${BENCH_VM_N:-20}

echo "== host ($(uname -r)), benchtime ${N}x"
go test -count=1 -run '^$' -bench . -benchtime "${N}x" ./cgroup | grep -E '^(Benchmark|ok|FAIL)'

if [ "${BENCH_VM:-1}" = 1 ]; then
	echo "== cgroup v2 VM (qemu TCG), benchtime ${VM_N}x"
	VMTEST_ARGS="-test.run=^\$ -test.bench=. -test.benchtime=${VM_N}x" \
		bash test/vm/run.sh ./cgroup 2>&1 | grep -E '^(Benchmark|PASS|FAIL|vmtest: (cgroup|total))'
fi
