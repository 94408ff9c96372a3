#!/usr/bin/env bash
# The local farm's model-signing key pair: created once with the minisign tool
# under the user's cache and reused afterwards. The secret key has no password
# (-W) because it signs only the local test farm's models; a real farm keeps its
# key with the publisher, password-protected (README, "Model store and cache").
# Prints the directory holding model-signing.pub and model-signing.key.
# Environment: PIFARM_CACHE (default ~/.cache/pifarm).
set -euo pipefail

dir=${PIFARM_CACHE:-$HOME/.cache/pifarm}/farm-secrets
mkdir -p "$dir"
chmod 0700 "$dir"
if [ ! -s "$dir/model-signing.key" ] || [ ! -s "$dir/model-signing.pub" ]; then
  command -v minisign >/dev/null || { echo "farm-keys: minisign is not installed (apt install minisign)" >&2; exit 1; }
  rm -f "$dir/model-signing.key" "$dir/model-signing.pub"
  minisign -G -W -p "$dir/model-signing.pub" -s "$dir/model-signing.key" >/dev/null
  chmod 0600 "$dir/model-signing.key"
fi
echo "$dir"
