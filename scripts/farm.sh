#!/usr/bin/env bash
# `make farm`: brings the local container farm up from nothing, or converges
# the one already running, stage by stage, and ends with the farm answering a
# chat prompt through HAProxy and through NATS. Every stage prints its time,
# and a table of them closes the run. What is cached (~/.cache/pifarm: the
# llama.cpp build, the test models, the farm's keys; the venv; the base image)
# is reused, so a second run only converges.
#
# Usage: farm.sh   (run by `make farm`; ANSIBLE_* and PATH come from the Makefile)
# Environment: PIFARM_CACHE (default ~/.cache/pifarm).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
inventory=inventory/local
stage_names=() stage_seconds=()

stage() {
  local name=$1 start rc=0
  shift
  printf '\n[farm] === %s\n' "$name" >&2
  start=$(date +%s)
  "$@" || rc=$?
  stage_names+=("$name")
  stage_seconds+=($(($(date +%s) - start)))
  if [ "$rc" -ne 0 ]; then
    printf '[farm] %s failed after %d s (exit %d)\n' "$name" "${stage_seconds[-1]}" "$rc" >&2
    report
    exit "$rc"
  fi
  printf '[farm] %s: %d s\n' "$name" "${stage_seconds[-1]}" >&2
}

report() {
  local i total=0
  printf '\n[farm] stage times\n' >&2
  for i in "${!stage_names[@]}"; do
    printf '[farm]   %-34s %5d s\n' "${stage_names[$i]}" "${stage_seconds[$i]}" >&2
    total=$((total + stage_seconds[i]))
  done
  printf '[farm]   %-34s %5d s (%d min %d s)\n' total "$total" $((total / 60)) $((total % 60)) >&2
}

playbook() { ansible-playbook -i "$inventory" "$@"; }

stage "test bed (docker, venv, image)" scripts/testbed.sh all
stage "signing keys" scripts/farm-keys.sh
# The one build path (make test's llama-build stage runs the same script):
# about 10-15 min on 2 cores the first time, with the compiler's progress on
# the terminal; a verified reuse (1 s) afterwards. The builder container then
# uploads this artifact instead of compiling (runtime_builder_artifact_cache).
stage "llama.cpp build (or cached)" env PIFARM_BUILD_JOBS="$(nproc)" scripts/llama-server.sh
# The store answers when an earlier run brought it up: the whole site run below
# converges it again anyway, so only a new store needs its own run first (the
# model is published to it before the nodes' first sync).
store_answers() {
  # The store's host and port where the inventory and the farm role name them.
  python3 - "$inventory/hosts.yml" roles/farm/defaults/main.yml <<'PY'
import subprocess, sys, urllib.error, urllib.request
import yaml
storage = next(iter(yaml.safe_load(open(sys.argv[1]))["all"]["children"]["pifarm_storage"]["hosts"]))
port = yaml.safe_load(open(sys.argv[2]))["farm_store_port"]
inspect = ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", storage]
address = subprocess.run(inspect, capture_output=True, text=True, check=False).stdout.strip()
if not address:
    sys.exit(1)
try:
    urllib.request.urlopen(f"http://{address}:{port}/", timeout=3)
except urllib.error.HTTPError:
    pass  # an answer, whatever its status: the store is up
except OSError:
    sys.exit(1)
PY
}

stage "containers" playbook molecule/resources/farm.yml
if store_answers; then
  printf '\n[farm] the store already answers: it is converged with the whole farm below\n' >&2
else
  stage "store and artifacts (store.yml)" playbook playbooks/store.yml
fi
stage "publish the chat model" playbook molecule/resources/publish_test_model.yml
stage "site.yml (whole farm)" playbook playbooks/site.yml
stage "ask the farm" playbook molecule/resources/farm_answer.yml
report
printf '\n' >&2
cat build/farm.txt
