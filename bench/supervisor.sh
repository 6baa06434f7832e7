#!/bin/sh
# Supervisor benchmarks on real cgroups with rbee-simworker (run as root):
#   spawn request → process running in its leaf (p50/p99/max),
#   crash (SIGKILL) → next process running with zero backoff,
#   stale detection lag past the threshold (threshold → detected).
# Usage: bench/supervisor.sh [count]   (default 50 iterations each)
set -eu
cd "$(dirname "$0")/.."
n="${1:-50}"
exec go test ./supervisor/ -run '^$' -bench 'BaselineExec|SpawnToRunning|CrashToRestarted|StaleDetection|HandleDatagram' -benchtime "${n}x" -count 1
