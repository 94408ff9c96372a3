#!/usr/bin/env bash
# Runs everything CI checks, stage by stage, and ends with one line
# "summary: N passed, M failed" (pytest counts each test; every other stage
# counts as one check). Exits non-zero when anything failed.
#
# Usage: run-tests.sh [STAGE...]   (default: all stages, in order)
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
# shellcheck source=/dev/null
source "$repo/.venv/bin/activate"
export ANSIBLE_COLLECTIONS_PATH="$repo/.venv/collections"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 NO_COLOR=1

logs="$repo/build/logs"
mkdir -p "$logs"
# Every molecule scenario is a stage of its own, found by its molecule.yml.
# Scenarios that converge runtime_builder (directly or through the site
# playbook, as `default`, the farm, does) use the llama.cpp build, as do the
# integration tests (pytest): they run after the llama-build stage, the others
# before. `default` runs last and alone: its verify measures the farm, and a
# stage beside it would be in its figures.
mapfile -t scenarios < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)
early_scenarios=() build_scenarios=()
for scenario in "${scenarios[@]}"; do
  if [ "$scenario" = default ]; then
    continue
  elif grep -qs -e runtime_builder -e playbooks/site.yml "molecule/$scenario"/*.yml; then
    build_scenarios+=("molecule-$scenario")
  else
    early_scenarios+=("molecule-$scenario")
  fi
done
all_stages=(yamllint ansible-lint ruff shellcheck sanity collection "${early_scenarios[@]}"
  llama-build "${build_scenarios[@]}" pytest pytest-unit molecule-default)
# Stages that run side by side, PIFARM_TEST_JOBS (default 2) at a time: they
# have their own containers and networks and mostly wait on apt, pip and
# systemd. The first group needs no llama.cpp build (on a cold host it builds
# in the background meanwhile); the second does.
# The unit tests (7 min) go beside the integration tests, in the slot that
# llama_server (18 min) leaves: beside the early scenarios they made that group
# the longer one (measured: 17.5 min wall with them, about 14 without).
# Members start in the order listed: llama_server, the longest, first.
early_group=("${early_scenarios[@]}")
build_group=("${build_scenarios[@]}" pytest pytest-unit)

stage_yamllint() { yamllint -s .; }
stage_ansible-lint() { ansible-lint; }
stage_ruff() { ruff check . && ruff format --check .; }
stage_shellcheck() { git ls-files -co --exclude-standard -z -- '*.sh' .ci/run 'molecule/*/files/*' | xargs -0 shellcheck; }
# llama.cpp for the tests that run llama-server and for the builder in
# molecule and the farm: built once per source, flags and architecture into
# ~/.cache/pifarm (about 15 min on 2 cores), a verified reuse (1 s) after that.
# When earlier stages run first, the build starts with them in the background
# at low priority, using the core the mostly single-threaded lint, sanity and
# molecule stages leave idle; the stage then waits for it.
build_llama() { PIFARM_BUILD_JOBS=$(nproc) scripts/llama-server.sh; }
llama_build_pid=
stage_llama-build() {
  if [ -z "$llama_build_pid" ]; then
    build_llama
    return
  fi
  local rc
  wait "$llama_build_pid" 2>/dev/null
  rc=$(cat "$logs/llama-build-background.rc" 2>/dev/null || echo 1)
  cat "$logs/llama-build-background.log"
  echo "background build: $(($(date +%s) - llama_build_start)) s since it started with the first stage"
  return "$rc"
}
# The unit and role tests need no llama.cpp build; the integration tests run llama-server.
stage_pytest-unit() { pytest tests/unit tests/roles --junitxml="$repo/build/pytest-unit.xml"; }
stage_pytest() { pytest tests/integration --junitxml="$repo/build/pytest.xml"; }
stage_sanity() { scripts/sanity.sh; }

stage_collection() {
  # Build the Galaxy tarball and install it offline into an empty path: what a
  # user without Galaxy access gets. Dependencies must already be installed.
  local out="$repo/build/collection" empty="$repo/build/collection/empty-path"
  rm -rf "$out" && mkdir -p "$empty"
  ansible-galaxy collection build --force --output-path "$out" . || return 1
  # Only the empty path is configured, so the checkout's own link cannot count
  # as "already installed"; the dependencies resolve from the ansible package.
  ANSIBLE_COLLECTIONS_PATH="$empty" \
    ansible-galaxy collection install --offline -p "$empty" "$out"/pifarm-inference-*.tar.gz || return 1
  local roles
  roles=$(ANSIBLE_COLLECTIONS_PATH="$empty" ansible-doc -t role -l pifarm.inference) || return 1
  echo "$roles"
  grep -Eq '^pifarm\.inference\.node_base[: ]' <<<"$roles" || return 1
  # Every role, module and filter of the tree renders from the installed tarball:
  # ansible-doc warns and exits 0 for a plugin it cannot find or document.
  local kind names out
  for kind in role module filter; do
    case $kind in
      role) mapfile -t names < <(find roles -mindepth 1 -maxdepth 1 -type d -printf '%f\n') ;;
      module) mapfile -t names < <(find plugins/modules -name '*.py' ! -name '__init__.py' -printf '%f\n' | sed 's/\.py$//') ;;
      filter) mapfile -t names < <(find plugins/filter -name '*.yml' -printf '%f\n' | sed 's/\.yml$//') ;;
    esac
    out=$(ANSIBLE_COLLECTIONS_PATH="$empty" ansible-doc -t "$kind" "${names[@]/#/pifarm.inference.}" 2>&1) || return 1
    if grep -E '\[(WARNING|ERROR)\]' <<<"$out"; then
      echo "ansible-doc -t $kind: the lines above" >&2
      return 1
    fi
    echo "ansible-doc -t $kind: ${#names[@]} rendered"
  done
}

# molecule wraps its output to the terminal's width (COLUMNS when not a
# terminal): wide enough that a [figures] line stays one line for the summary.
run_molecule() { COLUMNS=4000 molecule test -s "$1"; }

junit_report() {
  # prints "passed failed" from pytest's junit report, then each failed or
  # erroring test, one per line
  python3 - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 1")
    raise SystemExit
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - bad - skipped, bad)
for case in root.iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        print(f"{case.get('classname')}::{case.get('name')}")
PY
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${all_stages[@]}")
if [ ${#stages[@]} -gt 1 ] && [ "${stages[0]}" != llama-build ] && [[ " ${stages[*]} " == *" llama-build "* ]]; then
  llama_build_start=$(date +%s)
  rm -f "$logs/llama-build-background.rc"
  nice -n 15 bash -c "$(declare -f build_llama); build_llama; echo \$? >'$logs/llama-build-background.rc'" \
    >"$logs/llama-build-background.log" 2>&1 &
  llama_build_pid=$!
fi
for stage in "${stages[@]}"; do
  if ! declare -F "stage_$stage" >/dev/null && [[ " ${scenarios[*]/#/molecule-} " != *" $stage "* ]]; then
    echo "unknown stage '$stage'; stages: ${all_stages[*]}" >&2
    exit 2
  fi
done

# Runs one stage into build/logs/<stage>.log; its exit code and seconds go to
# <stage>.result for report_stage.
run_stage() {
  local stage=$1 start rc
  local run=("stage_$stage")
  [[ $stage == molecule-* ]] && run=(run_molecule "${stage#molecule-}")
  start=$(date +%s)
  [[ $stage != pytest* ]] || rm -f "$repo/build/$stage.xml"
  "${run[@]}" >"$logs/$stage.log" 2>&1
  rc=$?
  echo "$rc $(($(date +%s) - start))" >"$logs/$stage.result"
}

passed=0
failed=0
failed_stages=()
failed_tests=()
# Prints a finished stage's line, its [figures] lines, and on failure the end of its log.
report_stage() {
  local stage=$1 log="$logs/$1.log" rc secs
  read -r rc secs <"$logs/$stage.result"
  printf '=== %-20s ' "$stage"
  if [[ $stage == pytest* ]]; then
    local report
    mapfile -t report < <(junit_report "$repo/build/$stage.xml")
    read -r p f <<<"${report[0]}"
    [ "$rc" -eq 0 ] || [ "$f" -gt 0 ] || f=1
    passed=$((passed + p))
    failed=$((failed + f))
    printf '%s (%d passed, %d failed) %ds\n' "$([ "$f" -eq 0 ] && echo PASS || echo FAIL)" "$p" "$f" "$secs"
    failed_tests+=("${report[@]:1}")
  elif [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    printf 'PASS %ds\n' "$secs"
  else
    failed=$((failed + 1))
    printf 'FAIL %ds (log: %s)\n' "$secs" "${log#"$repo"/}"
  fi
  # The measurements' figures (pytest's and the scenarios' verify) in the summary.
  grep -o '\[figures\].*' "$log" | sed -e "s/[\"',]*\$//" -e 's/^/    /'
  if [ "$rc" -ne 0 ]; then
    failed_stages+=("$stage")
    tail -n 40 "$log" | sed 's/^/    | /'
  fi
}

# Runs the members of a group that were asked for side by side, at most
# PIFARM_TEST_JOBS at a time, the longest (network, about 8 min) first, and
# reports them in order once all have finished.
parallel_jobs=${PIFARM_TEST_JOBS:-2}
run_group() {
  local member members=() launch=() pids=()
  for member in "$@"; do
    [[ " ${stages[*]} " == *" $member "* ]] || continue
    members+=("$member")
    if [ "$member" = molecule-network ]; then launch=("$member" "${launch[@]}"); else launch+=("$member"); fi
  done
  for member in "${launch[@]}"; do
    # Polled, not wait -n: that would also reap the background build.
    while [ "$(jobs -rp | grep -vcx "${llama_build_pid:-none}")" -ge "$parallel_jobs" ]; do
      sleep 2
    done
    run_stage "$member" &
    pids+=($!)
  done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
  for member in "${members[@]}"; do
    report_stage "$member"
  done
}

early_done='' build_done=''
for stage in "${stages[@]}"; do
  if [[ " ${early_group[*]} " == *" $stage "* ]]; then
    [ -z "$early_done" ] || continue
    run_group "${early_group[@]}"
    early_done=1
  elif [[ " ${build_group[*]} " == *" $stage "* ]]; then
    [ -z "$build_done" ] || continue
    run_group "${build_group[@]}"
    build_done=1
  else
    run_stage "$stage"
    report_stage "$stage"
  fi
done

[ ${#failed_stages[@]} -eq 0 ] || echo "failed stages: ${failed_stages[*]}"
# Last, next to the summary: the lines CI shows when its output is cut.
[ ${#failed_tests[@]} -eq 0 ] || printf 'failed test: %s\n' "${failed_tests[@]}"
echo "summary: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
