#!/usr/bin/env bash
# Proxy overhead with the genuine llama-server: the same greedy streamed chat
# completion straight to llama-server and through the hive, alternating, in
# one run; prints time-to-first-token and tokens/s ratios (hive / direct),
# then the memory estimate beside what llama-server uses. Needs root (the
# hive's cgroups). Goal: TTFT ratio <= 1.05, tokens/s ratio >= 0.95.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/build-llama-server.sh | tail -n 1)
export RBEE_LLAMA_SERVER="$bin"
go test -count=1 -run '^$' -bench 'ProxyOverhead' -benchtime 1x ./test/engine
report=$(mktemp)
trap 'rm -f "$report"' EXIT
RBEE_ENGINE_REPORT="$report" go test -count=1 -run 'TestLlamaServerThroughTheHive$/estimate' ./test/engine >/dev/null
echo "memory estimate vs llama-server:"
sed 's/^/  /' "$report"
