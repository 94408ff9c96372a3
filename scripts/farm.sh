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
stage "containers" playbook molecule/resources/farm.yml
stage "store (site.yml on storage)" playbook playbooks/site.yml --limit pifarm_storage
stage "publish the chat model" playbook molecule/resources/publish_test_model.yml
stage "site.yml (whole farm)" playbook playbooks/site.yml
stage "ask the farm" playbook molecule/resources/farm_answer.yml
report
printf '\n' >&2
cat build/farm.txt
