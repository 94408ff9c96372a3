#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-bench and llama-quantize ONCE per
# (source, flags, architecture) and packs them as a versioned, checksummed
# artifact that nodes install without a compiler or internet access. This is
# the one build implementation: the runtime_builder role runs this script on
# the builder host, and scripts/llama-server.sh runs it for the tests.
#
# Source: by default the llama.cpp tree vendored in a pinned llama-cpp-python
# sdist, fetched with `pip download` (so the host's pip index, proxy and CA
# settings apply) and verified against the sha256 below; or a tarball the
# operator supplies with its sha256 and a version name.
#
# Output, in the output directory:
#   llama.cpp-<version>-<arch>-<flagshash>.tar.gz   bin/ and BUILDINFO
#   llama.cpp-<version>-<arch>-<flagshash>.tar.gz.sha256   (sha256sum -c format)
# <flagshash> is the first 12 hex digits of the sha256 of the cmake flags, one
# per line. An existing artifact for the same source sha256, flags and
# architecture is reused (verified against its .sha256), not rebuilt.
#
# Usage: pifarm-build-llama.sh --output-dir DIR [options]
#   --output-dir DIR      where artifacts go                  (PIFARM_LLAMA_OUTPUT_DIR)
#   --source FILE         operator tarball instead of the pinned sdist (PIFARM_LLAMA_SOURCE)
#   --source-sha256 HEX   its sha256; required with --source  (PIFARM_LLAMA_SOURCE_SHA256)
#   --version NAME        its version name, [A-Za-z0-9._]+; required with --source
#                         (PIFARM_LLAMA_VERSION)
#   --arch-flags "FLAGS"  cmake flags replacing the architecture's defaults (PIFARM_LLAMA_ARCH_FLAGS)
#   --jobs N              parallel compile jobs, default: nproc (PIFARM_LLAMA_JOBS)
#   --source-cache DIR    keeps the downloaded sdist, default: ~/.cache/pifarm/sources
#                         (PIFARM_LLAMA_SOURCE_CACHE)
#   --check               build nothing: print the artifact path, and exit 0 when it
#                         exists, 3 when a build would be needed
#   --unpack              also unpack the artifact next to it (DIR/<name>/bin) and point
#                         DIR/current at it: the host's own copy of the tools
# Environment: PYTHON (default python3) runs pip; TMPDIR holds the build tree (~2 GB).
# Prints the artifact path on stdout; progress and build output go to stderr.
set -euo pipefail

# The pinned default source: llama_cpp_python-0.3.36.tar.gz, 76,589,250 bytes.
# The sha256 is the digest PyPI publishes for that file: the JSON API
# https://pypi.org/pypi/llama-cpp-python/json, releases["0.3.36"], the sdist's
# digests.sha256 (the per-release URL .../0.3.36/json answered 404 from the CI
# network on 2026-11-22), identical to hashes.sha256 in the PEP 691 index
# https://pypi.org/simple/llama-cpp-python/ and to sha256sum of the file
# `pip download` fetched the same day.
readonly SDIST_PACKAGE=llama-cpp-python
readonly SDIST_VERSION=0.3.36
readonly SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# The llama.cpp commit that sdist vendors (its vendor/llama.cpp submodule HEAD,
# 0c1e57098bba43ac29e6e3b677cdceebdd22334f): the artifact's version name.
readonly SDIST_LLAMA_VERSION=g0c1e570

# Flags every build gets, whatever the architecture: static binaries, no
# network code (no libcurl/OpenSSL model downloads, no web UI fetched from a
# hub at build time), nothing built beyond the three tools.
readonly COMMON_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
)
readonly TARGETS=(llama-server llama-bench llama-quantize)
readonly EXIT_NEEDS_BUILD=3

die() {
  echo "pifarm-build-llama: $*" >&2
  exit 1
}
log() { echo "pifarm-build-llama: $*" >&2; }
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Per-architecture defaults. x86_64 test hosts: a native build crashes in the
# AMX kernel (ggml_backend_amx_mul_mat) on their CPUs, so AVX2/FMA/F16C are
# named explicitly. aarch64 (Raspberry Pi 5): the builder is a Pi 5 or another
# Cortex-A76 host, so a native build targets exactly the nodes' CPU.
arch_default_flags() {
  case "$1" in
    x86_64) echo "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
    aarch64) echo "-DGGML_NATIVE=ON" ;;
    *) return 1 ;;
  esac
}

output_dir=${PIFARM_LLAMA_OUTPUT_DIR:-}
source_file=${PIFARM_LLAMA_SOURCE:-}
source_sha256=${PIFARM_LLAMA_SOURCE_SHA256:-}
version=${PIFARM_LLAMA_VERSION:-}
arch_flags=${PIFARM_LLAMA_ARCH_FLAGS:-}
jobs=${PIFARM_LLAMA_JOBS:-}
source_cache=${PIFARM_LLAMA_SOURCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pifarm/sources}
python=${PYTHON:-python3}
check_only=false
unpack=false

while (($#)); do
  case "$1" in
    --output-dir) output_dir=${2:?--output-dir needs a directory}; shift 2 ;;
    --source) source_file=${2:?--source needs a file}; shift 2 ;;
    --source-sha256) source_sha256=${2:?--source-sha256 needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a name}; shift 2 ;;
    --arch-flags) arch_flags=${2:?--arch-flags needs cmake flags}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    --source-cache) source_cache=${2:?--source-cache needs a directory}; shift 2 ;;
    --check) check_only=true; shift ;;
    --unpack) unpack=true; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[[ -n "$output_dir" ]] || die "no output directory: pass --output-dir DIR"
if [[ -n "$source_file" ]]; then
  [[ -n "$source_sha256" ]] || die "source $source_file has no expected sha256: pass --source-sha256"
  [[ -n "$version" ]] || die "source $source_file has no version name: pass --version"
elif [[ -n "$source_sha256" || -n "$version" ]]; then
  die "--source-sha256 and --version describe an operator tarball: pass --source FILE with them"
else
  source_sha256=$SDIST_SHA256
  version=$SDIST_LLAMA_VERSION
fi
source_sha256=${source_sha256,,}
[[ "$source_sha256" =~ ^[0-9a-f]{64}$ ]] || die "source sha256 '$source_sha256' is not 64 hex digits"
[[ "$version" =~ ^[A-Za-z0-9._]+$ ]] || die "version name '$version' must match [A-Za-z0-9._]+ (it is part of the file name)"
jobs=${jobs:-$(nproc)}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs '$jobs' is not a positive number"

arch=$(uname -m)
if [[ -z "$arch_flags" ]]; then
  arch_flags=$(arch_default_flags "$arch") \
    || die "architecture $arch has no default flags: pass --arch-flags \"-DGGML_NATIVE=ON ...\""
fi
read -r -a arch_flag_list <<<"$arch_flags"
cmake_flags=("${COMMON_FLAGS[@]}" "${arch_flag_list[@]}")
flags_hash=$(printf '%s\n' "${cmake_flags[@]}" | sha256sum | cut -c1-12)
name="llama.cpp-${version}-${arch}-${flags_hash}"

output_dir=$(realpath -m "$output_dir")
artifact="$output_dir/$name.tar.gz"

buildinfo_value() { sed -n "s/^$1=//p" <<<"$2"; }

# Prints nothing and returns 0 when the artifact exists, matches its .sha256
# and was built from this source with these flags on this architecture.
existing_artifact_matches() {
  [[ -f "$artifact" && -f "$artifact.sha256" ]] || return 1
  local recorded actual info
  recorded=$(cut -d' ' -f1 "$artifact.sha256")
  actual=$(sha256_of "$artifact")
  if [[ "$recorded" != "$actual" ]]; then
    log "existing $artifact has sha256 $actual but its .sha256 says $recorded: not reusing it"
    return 1
  fi
  info=$(tar -xzOf "$artifact" BUILDINFO) || die "existing $artifact has no BUILDINFO: remove it"
  local built_from built_flags
  built_from=$(buildinfo_value source_sha256 "$info")
  if [[ "$built_from" != "$source_sha256" ]]; then
    die "existing $artifact was built from source sha256 $built_from, this source is $source_sha256:" \
      "two sources share the version name $version; remove the artifact or choose another --version"
  fi
  built_flags=$(buildinfo_value cmake_flags "$info")
  [[ "$built_flags" == "${cmake_flags[*]}" ]] \
    || die "existing $artifact was built with flags '$built_flags', not '${cmake_flags[*]}' (flags hash collision)"
}

# Prints the artifact's path and exits; with --unpack (never with --check) the
# tree is unpacked once, into a temporary directory renamed into place, so a
# half-unpacked tree never carries the artifact's name.
finish() {
  if $unpack && ! $check_only; then
    local tree="${artifact%.tar.gz}"
    if [[ ! -x "$tree/bin/llama-server" ]]; then
      local staging
      staging=$(mktemp -d "$output_dir/.unpack.XXXXXX")
      tar -xzf "$artifact" -C "$staging" || { rm -rf "$staging"; die "cannot unpack $artifact"; }
      chmod 0755 "$staging"
      rm -rf "$tree"
      mv -T "$staging" "$tree"
    fi
    ln -sfn "$(basename "$tree")" "$output_dir/current"
  fi
  echo "$artifact"
  exit 0
}

reuse_existing_artifact() {
  if existing_artifact_matches; then
    log "reusing $artifact: already built from source sha256 $source_sha256 for $arch with these flags"
    finish
  fi
}

# --check looks without creating anything.
if $check_only; then
  reuse_existing_artifact
  log "no artifact $artifact yet: a build is needed"
  echo "$artifact"
  exit "$EXIT_NEEDS_BUILD"
fi

# One build per artifact at a time: a second caller waits, then reuses.
mkdir -p "$output_dir"
exec 9>"$output_dir/.$name.lock"
flock 9
reuse_existing_artifact

for tool in cmake c++ tar gzip readelf; do
  command -v "$tool" >/dev/null || die "the builder needs $tool (install cmake, g++, binutils)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/pifarm-build-llama.XXXXXX")
trap 'rm -rf "$work"' EXIT

verify_sha256() {
  local file=$1 expected=$2 actual
  actual=$(sha256_of "$file")
  [[ "$actual" == "$expected" ]] || die "source $file has sha256 $actual, expected $expected"
}

# The pinned sdist: from the source cache when a verified copy is there,
# otherwise downloaded once with pip and kept.
fetch_sdist() {
  local cached="$source_cache/llama_cpp_python-${SDIST_VERSION}.tar.gz"
  if [[ -f "$cached" ]] && [[ "$(sha256_of "$cached")" == "$SDIST_SHA256" ]]; then
    echo "$cached"
    return
  fi
  mkdir -p "$source_cache"
  local download
  download=$(mktemp -d "$source_cache/.download.XXXXXX")
  log "downloading $SDIST_PACKAGE==$SDIST_VERSION sdist (76 MB) with pip"
  if ! "$python" -m pip download --quiet --no-binary :all: --no-deps --dest "$download" \
    "$SDIST_PACKAGE==$SDIST_VERSION" >&2; then
    rm -rf "$download"
    die "pip could not download $SDIST_PACKAGE==$SDIST_VERSION (needs PyPI or a mirror in pip's config)"
  fi
  local fetched="$download/llama_cpp_python-${SDIST_VERSION}.tar.gz"
  if [[ ! -f "$fetched" ]]; then
    rm -rf "$download"
    die "pip download did not produce llama_cpp_python-${SDIST_VERSION}.tar.gz"
  fi
  local actual
  actual=$(sha256_of "$fetched")
  if [[ "$actual" != "$SDIST_SHA256" ]]; then
    rm -rf "$download"
    die "source $SDIST_PACKAGE==$SDIST_VERSION from pip has sha256 $actual, expected $SDIST_SHA256"
  fi
  mv -f "$fetched" "$cached"
  rm -rf "$download"
  echo "$cached"
}

if [[ -n "$source_file" ]]; then
  [[ -f "$source_file" ]] || die "source $source_file does not exist"
  verify_sha256 "$source_file" "$source_sha256"
else
  source_file=$(fetch_sdist)
fi

# The llama.cpp tree: vendor/llama.cpp inside a llama-cpp-python sdist, or the
# top directory of a llama.cpp tarball.
tar -xzf "$source_file" -C "$work" || die "source $source_file is not a gzip tarball"
tree=""
for candidate in "$work"/*/vendor/llama.cpp "$work"/*; do
  if [[ -f "$candidate/CMakeLists.txt" && -d "$candidate/tools/server" ]]; then
    tree=$candidate
    break
  fi
done
[[ -n "$tree" ]] || die "source $source_file has no llama.cpp tree (CMakeLists.txt and tools/server)"

log "building $name from $(basename "$source_file") with ${cmake_flags[*]}"
started=$(date +%s)
cmake -S "$tree" -B "$work/build" "${cmake_flags[@]}" >&2 \
  || die "cmake could not configure $tree with ${cmake_flags[*]} (output above)"
cmake --build "$work/build" --target "${TARGETS[@]}" -j "$jobs" >&2 \
  || die "building ${TARGETS[*]} failed (compiler output above)"
build_seconds=$(($(date +%s) - started))

stage="$work/stage"
mkdir -p "$stage/bin"
for target in "${TARGETS[@]}"; do
  [[ -x "$work/build/bin/$target" ]] || die "the build produced no $work/build/bin/$target"
  cp "$work/build/bin/$target" "$stage/bin/$target"
done
# The binaries must run here: a native build runs on its own builder, and an
# x86 build with the wrong instruction set fails now rather than on a node.
server_version=$("$stage/bin/llama-server" --version 2>&1 | head -n1) \
  || die "the built llama-server does not run: $server_version"
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$work/build/CMakeCache.txt")
compiler=$("${cxx:-c++}" --version | head -n1)
needed=$(for target in "${TARGETS[@]}"; do
  readelf -d "$stage/bin/$target" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'
done | sort -u | paste -sd' ')

cat >"$stage/BUILDINFO" <<EOF
name=$name
version=$version
arch=$arch
source=$(basename "$source_file")
source_sha256=$source_sha256
cmake_flags=${cmake_flags[*]}
flags_hash=$flags_hash
compiler=$compiler
cmake=$(cmake --version | head -n1)
targets=${TARGETS[*]}
llama_server_version=$server_version
needed_libraries=$needed
build_seconds=$build_seconds
built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

# Same layout, owners and order on every build; gzip -n leaves out the time.
tar --sort=name --owner=0 --group=0 --numeric-owner -C "$stage" -cf - BUILDINFO bin \
  | gzip -n >"$output_dir/.$name.tar.gz.tmp"
printf '%s  %s\n' "$(sha256_of "$output_dir/.$name.tar.gz.tmp")" "$name.tar.gz" >"$output_dir/.$name.sha256.tmp"
mv -f "$output_dir/.$name.tar.gz.tmp" "$artifact"
mv -f "$output_dir/.$name.sha256.tmp" "$artifact.sha256"
log "built $artifact in ${build_seconds}s"
finish
