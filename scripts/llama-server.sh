#!/usr/bin/env bash
# Provides llama.cpp's llama-server (with llama-bench and llama-quantize) for
# the tests on this host: the artifact is built by the collection's one build
# script, roles/runtime_builder/files/pifarm-build-llama.sh (the runtime_builder
# role runs the same script on the builder), into the cache outside the
# repository, and unpacked next to it. An artifact that is already there is
# reused; only a new source, new flags or a new architecture build again
# (about 15 minutes on 2 cores).
#
# Usage: llama-server.sh [--cached-only]
#   prints the directory holding llama-server, llama-bench and llama-quantize
#   (unpacked by the build script next to the artifact);
#   --cached-only builds nothing and exits 3 when no build is cached.
# Environment: PIFARM_CACHE (default ~/.cache/pifarm), PIFARM_BUILD_JOBS
# (default 2), PIFARM_BUILD_NICE (default 10: the build shares the host).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PIFARM_CACHE:-$HOME/.cache/pifarm}
builds="$cache/llama.cpp"
build_script="$repo/roles/runtime_builder/files/pifarm-build-llama.sh"

check=()
case "${1:-}" in
  --cached-only) check=(--check) ;;
  "") ;;
  *) echo "usage: llama-server.sh [--cached-only]" >&2; exit 2 ;;
esac

# The build script's exit status (3: nothing cached) is this script's too.
# --unpack leaves the tools next to the artifact (unpacked once).
artifact=$(nice -n "${PIFARM_BUILD_NICE:-10}" "$build_script" "${check[@]}" --unpack \
  --output-dir "$builds" --source-cache "$cache/sources" --jobs "${PIFARM_BUILD_JOBS:-2}")
unpacked="${artifact%.tar.gz}"
# --check does not unpack: a cached artifact from before --unpack existed is
# unpacked by a second call without --check (a reuse, no build).
if [[ ! -x "$unpacked/bin/llama-server" ]]; then
  "$build_script" --unpack --output-dir "$builds" --source-cache "$cache/sources" >/dev/null
fi
echo "$unpacked/bin"
