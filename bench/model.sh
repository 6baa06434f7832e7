#!/bin/sh
# Model download and catalog benchmarks (package model).
#   bench/model.sh            256 MiB per download, 4 downloads each way
#   RBEE_BENCH_MIB=1024 COUNT=3 bench/model.sh
# Download: the Store (HF resolve redirect -> loopback CDN, stream to
# .incomplete, sha256, fsync, rename, catalog insert) against curl -L -o on the
# same file from the same server in the same run; store/curl is the ratio of
# throughputs (1.0 = as fast as curl), store/curl+fsync compares with curl
# followed by an fsync of its output, which is what the Store guarantees.
# Catalog: Ensure(present)/Touch/Acquire/List mixed from GOMAXPROCS goroutines
# against 200 catalogued models (SQLite WAL, busy_timeout).
set -eu
cd "$(dirname "$0")/.."
command -v curl >/dev/null || { echo "curl missing: apt-get install -y curl" >&2; exit 1; }
export RBEE_BENCH_MIB="${RBEE_BENCH_MIB:-256}"
go test -run '^$' -bench 'DownloadVsCurl' -benchtime "${COUNT:-4}x" -count 1 ./model/
go test -run '^$' -bench 'CatalogConcurrent' -benchtime "${CATALOG_TIME:-2s}" -count 1 ./model/
