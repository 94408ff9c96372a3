#!/usr/bin/env bash
# Prepares this machine to run the pifarm test bed, idempotently and from
# nothing (a fresh Debian 12 host, as root):
#   - Debian's docker engine, debootstrap, python3-venv and nats-server (its service
#     disabled) when missing;
#   - dockerd running (started here when nothing else runs it);
#   - the systemd base image (scripts/build-image.sh; cached by recipe hash);
#   - the Python venv .venv/ with the pinned tooling and the node agent;
#   - the collection visible to Ansible from this checkout.
# Each step is skipped when its result is already there.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
image_name=${PIFARM_IMAGE_NAME:-pifarm-systemd}

log() { printf '[testbed] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "installing system packages and starting dockerd needs root; run as root or install: $*"
    exit 1
  fi
}

ensure_system_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  # The agent's signature tests cross-check py-minisign against the minisign tool.
  command -v minisign >/dev/null 2>&1 || missing+=(minisign)
  # The role tests read dpkg's package list through Ansible's apt bindings.
  /usr/bin/python3 -c 'import apt' >/dev/null 2>&1 || missing+=(python3-apt)
  # scripts/llama-server.sh builds llama.cpp once into ~/.cache/pifarm when no
  # artifact for its source, flags and architecture is cached there.
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v g++ >/dev/null 2>&1 || missing+=(build-essential)
  # The job tests (tests/integration/test_jobs.py) run real nats-servers with JetStream.
  [ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
  if [ ${#missing[@]} -eq 0 ]; then
    return
  fi
  need_root "${missing[*]}"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" nats-server "* ]]; then
    disable_packaged_nats
  fi
}

disable_packaged_nats() {
  # Debian's package enables nats-server.service on 4222; the tests start their own servers
  # on free ports, and a test host should not serve NATS to anyone.
  log "disabling the packaged nats-server.service"
  if [ -d /run/systemd/system ]; then
    systemctl disable --now nats-server.service >/dev/null 2>&1 || true
  else
    systemctl disable nats-server.service >/dev/null 2>&1 || true
  fi
}

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then
    return
  fi
  need_root dockerd
  if [ -d /run/systemd/system ]; then
    log "starting docker.service"
    systemctl start docker.service
  else
    # No init system manages services here (CI sandboxes): run dockerd ourselves.
    log "starting dockerd (log: /var/log/pifarm-dockerd.log)"
    nohup dockerd >/var/log/pifarm-dockerd.log 2>&1 &
  fi
  local waited=0
  until docker info >/dev/null 2>&1; do
    if [ "$waited" -ge 60 ]; then
      log "dockerd did not answer on its socket within 60 s; see /var/log/pifarm-dockerd.log"
      tail -n 20 /var/log/pifarm-dockerd.log >&2 || true
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

ensure_image() {
  local tag
  tag=$("$repo/scripts/build-image.sh" "$image_name")
  log "base image: $tag"
}

ensure_venv() {
  # Reinstall only when the pins changed: the stamp holds pyproject.toml's hash.
  local stamp="$venv/.pifarm-pyproject.sha256"
  local want
  want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  log "creating the Python venv at $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -e "${repo}[dev]"
  echo "$want" >"$stamp"
}

ensure_collection_link() {
  # Ansible finds collections under <path>/ansible_collections/<ns>/<name>:
  # link this checkout there so playbooks, molecule and ansible-doc use it.
  local link="$venv/collections/ansible_collections/pifarm/inference"
  mkdir -p "$(dirname "$link")"
  ln -sfn "$repo" "$link"
}

case "${1:-all}" in
  all)
    ensure_system_packages
    ensure_dockerd
    ensure_venv
    ensure_collection_link
    ensure_image
    ;;
  venv)
    ensure_system_packages
    ensure_venv
    ensure_collection_link
    ;;
  *)
    log "usage: testbed.sh [all|venv]"
    exit 2
    ;;
esac
