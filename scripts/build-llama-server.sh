#!/usr/bin/env bash
# Builds the genuine llama.cpp `llama-server` offline, from the llama.cpp source
# that the npm package node-llama-cpp@3.21.1 ships as a git bundle, into a
# cache outside the clone keyed by the llama.cpp commit. Later runs reuse it.
# Prints the path of the binary on its last line.
#
#   LLAMA_CACHE   cache root (default /var/cache/rbee-hive/llama-server)
#   LLAMA_JOBS    parallel compile jobs (default: nproc)
set -euo pipefail

pkg_version=3.21.1
cache=${LLAMA_CACHE:-/var/cache/rbee-hive/llama-server}
jobs=${LLAMA_JOBS:-$(nproc)}
mkdir -p "$cache"

log() { echo "build-llama-server: $*" >&2; }

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v git >/dev/null 2>&1 || need+=(git)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 1. The npm package (pinned exactly: some 3.22.x platform packages are not served).
npmdir="$cache/npm-$pkg_version"
bundle="$npmdir/node_modules/node-llama-cpp/llama/gitRelease.bundle"
if [ ! -f "$bundle" ]; then
  log "npm install node-llama-cpp@$pkg_version (source bundle only, no optional builds)"
  rm -rf "$npmdir.tmp" && mkdir -p "$npmdir.tmp"
  (cd "$npmdir.tmp" && npm install --no-audit --no-fund --omit=optional --ignore-scripts \
      --cache "$cache/npm-cache" "node-llama-cpp@$pkg_version" >&2)
  rm -rf "$npmdir" && mv "$npmdir.tmp" "$npmdir"
fi

commit=$(git bundle list-heads "$bundle" | awk 'NR==1{print substr($1,1,12)}')
[ -n "$commit" ] || { log "cannot read the commit of $bundle"; exit 1; }
out="$cache/$commit/llama-server"
if [ -x "$out" ]; then
  log "cached: $out"
  echo "$out"
  exit 0
fi

# 2. The source, from the bundle; 3. the build (about 25 min on 2 cores).
src="$cache/src-$commit"
if [ ! -d "$src/.git" ]; then
  rm -rf "$src"
  git clone -q "$bundle" "$src"
fi
log "building llama-server $commit with $jobs jobs (one-time, ~25 min on 2 cores)"
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF >&2
cmake --build "$src/build" --target llama-server -j"$jobs" >&2
mkdir -p "$cache/$commit"
install -m 0755 "$src/build/bin/llama-server" "$out.tmp"
mv "$out.tmp" "$out"
log "built: $out"
echo "$out"
