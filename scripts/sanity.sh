#!/usr/bin/env bash
# Runs `ansible-test sanity` on the collection as Galaxy would ship it.
#
# ansible-test needs the collection under ansible_collections/<ns>/<name> and a
# git tree to list its files, so the collection is built with ansible-galaxy
# (honouring build_ignore: what users get) and unpacked to build/sanity. It runs
# from its own venv so the sanity tests' pinned linters never replace the
# project's pinned ones in .venv.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
sanity_venv="$repo/.venv/sanity"
ansible_core_pin=$(grep -Eo '"ansible-core==[^"]+"' "$repo/pyproject.toml" | tr -d '"')
root="${PIFARM_SANITY_DIR:-$repo/build/sanity}/ansible_collections/pifarm/inference"

if [ ! -x "$sanity_venv/bin/ansible-test" ] || ! "$sanity_venv/bin/pip" show -q "${ansible_core_pin%%==*}" 2>/dev/null \
     || [ "$("$sanity_venv/bin/pip" show "${ansible_core_pin%%==*}" | sed -n 's/^Version: //p')" != "${ansible_core_pin##*==}" ]; then
  python3 -m venv "$sanity_venv"
  "$sanity_venv/bin/pip" install --quiet "$ansible_core_pin"
fi

# ansible-test bootstraps pip in each test venv with a get-pip script it
# downloads from a host CI cannot reach; it reuses a script saved at this path.
# This stand-in does the same job offline: pip from the interpreter's own
# ensurepip, then the requested pip version from PyPI.
pip_version=$(grep -Po "^\s+pip='\K[0-9.]+" "$("$sanity_venv/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py")
get_pip="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
if ! grep -qs "ENSUREPIP_OPTIONS" "$get_pip"; then
  mkdir -p "$(dirname "$get_pip")"
  cat >"$get_pip" <<'PY'
"""Offline stand-in for get-pip.py, written by pifarm's scripts/sanity.sh."""
import os
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip"])
# ensurepip leaves PIP_CONFIG_FILE=/dev/null behind, which would hide the
# host's pip configuration (its CA bundle, its index) from the real install.
env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONFIG_FILE", "ENSUREPIP_OPTIONS")}
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", *args], env=env)
PY
fi

rm -rf "$root"
mkdir -p "$root"
tarball_dir=$(mktemp -d)
trap 'rm -rf "$tarball_dir"' EXIT
"$sanity_venv/bin/ansible-galaxy" collection build --output-path "$tarball_dir" "$repo" >/dev/null
tar -xzf "$tarball_dir"/pifarm-inference-*.tar.gz -C "$root"
cd "$root"
git init -q
git add -A
PATH="$sanity_venv/bin:$PATH" ansible-test sanity --requirements --python 3.11 --color no "$@"
