#!/bin/sh
# Installed twice by the pifarm.inference network_bond role; the name decides:
#
# pifarm-network-apply STATE_DIR load|up
#     Applies the change of a bond described in STATE_DIR/change.env, after the
#     role saved what it replaces (STATE_DIR/files) and, for "up", armed the
#     revert timer. The role runs it in a transient unit (systemd-run --wait), so
#     it finishes even when the change cuts the SSH session that started it.
#       load  make the backend read the files (systemd-networkd applies what it reads)
#       up    also activate the bond (NetworkManager)
#
# pifarm-network-revert STATE_DIR
#     Restores the configuration saved before the last change and reloads the
#     backends: what the revert timer runs, and what an operator runs by hand.
#
# pifarm-network-revert --boot ROOT
#     At boot, before networking starts: restores every change under ROOT that was
#     never confirmed (the host went down while a change was on trial).
set -u
command=${0##*/}
rc=0

log() {
  echo "${command}[$BOND]: $*"
  echo "$(date -u '+%Y-%m-%dT%H:%M:%S.%NZ') $*" >>"$STATE/$command.log"
}

load_change() {
  STATE=$1
  # shellcheck source=/dev/null
  . "$STATE/change.env"
}

nm_running() { systemctl -q is-active NetworkManager.service; }
networkd_running() { systemctl -q is-active systemd-networkd.service; }

refresh_networkmanager() {
  nm_running || return 0
  if [ "$NM_CONF_CHANGED" = 1 ]; then
    log "NetworkManager: reloading its configuration (unmanaged devices)"
    nmcli general reload conf || rc=1
  fi
  [ -n "$NM_FILES" ] || return 0
  log "NetworkManager: loading $NM_FILES"
  # Loading a path that no longer exists drops its profile. nmcli exits 0 even
  # when a file does not load, so its message decides.
  # shellcheck disable=SC2086 # one argument per path
  out=$(nmcli connection load $NM_FILES 2>&1) || rc=1
  [ -z "$out" ] || log "$out"
  case $out in *"Could not load"*) rc=1 ;; esac
}

# $1: links to release from the bond (members that leave it).
# $2: links that join it: a member carries no address of its own, and networkd
#     does not remove the addresses an earlier configuration gave it.
refresh_networkd() {
  [ -n "$NETWORKD_FILES" ] || return 0
  networkd_running || return 0
  for link in $1; do
    if [ -e "/sys/class/net/$link/master" ]; then
      log "releasing $link from its bond"
      ip link set dev "$link" nomaster || rc=1
    fi
  done
  for link in $2; do
    if [ -e "/sys/class/net/$link" ]; then
      log "flushing the addresses of $link, which joins $BOND"
      ip address flush dev "$link" || rc=1
    fi
  done
  if [ "$RECREATE_BOND" = 1 ]; then
    # networkd never changes a netdev that exists, and does not parse a .netdev
    # again for a netdev it knows: delete the bond and restart networkd.
    if [ -e "/sys/class/net/$BOND" ]; then
      log "deleting $BOND so that systemd-networkd creates it from its .netdev"
      ip link delete dev "$BOND" || rc=1
    fi
    log "systemd-networkd: restarting"
    systemctl restart systemd-networkd.service || rc=1
  else
    log "systemd-networkd: reloading"
    networkctl reload || rc=1
  fi
}

# The backend that no longer owns the bond lets go first, then the owner takes it.
# $1, $2: links leaving and joining the bond (see refresh_networkd).
refresh_backends() {
  if [ "$BACKEND" = networkd ]; then
    refresh_networkmanager
    refresh_networkd "$1" "${2:-}"
  else
    refresh_networkd "$1" "${2:-}"
    refresh_networkmanager
  fi
}

# networkd reconfigures links after `reload` returns: wait until every member
# runs on its new file, so that the confirmation never sees the old addresses.
wait_for_networkd() {
  deadline=$(($(date +%s) + SETTLE_TIMEOUT))
  for pair in $MEMBER_FILES; do
    link=${pair%%=*}
    file=${pair#*=}
    until networkctl status --json=short "$link" 2>/dev/null | grep -qF "\"NetworkFile\":\"$file\""; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "$link is not configured from $file after ${SETTLE_TIMEOUT}s"
        rc=1
        break
      fi
      sleep 0.2
    done
  done
}

restore_files() {
  # Written first: the role reads it to tell a fired timer from a confirmed change.
  date -u '+%Y-%m-%dT%H:%M:%S.%NZ' >"$STATE/reverted-at"
  for path in $MANAGED; do
    saved="$STATE/files/${path##*/}"
    if [ -e "$saved" ]; then
      if cp -p "$saved" "$path"; then log "restored $path"; else rc=1; fi
    else
      if rm -f "$path"; then log "removed $path"; else rc=1; fi
    fi
  done
  rm -f "$STATE/pending"
}

apply() {
  load_change "${1:?usage: pifarm-network-apply STATE_DIR load|up}"
  : >"$STATE/$command.log"
  # Only a change on trial (up) may take the addresses away from joining links.
  joining=
  [ "${2:-load}" != up ] || joining=$ADDED_LINKS
  refresh_backends "$DROPPED_LINKS" "$joining"
  [ "$BACKEND" != networkd ] || wait_for_networkd
  if [ "$BACKEND" = networkmanager ] && [ "${2:-load}" = up ]; then
    log "NetworkManager: activating $BOND"
    nmcli --wait "$SETTLE_TIMEOUT" connection up uuid "$BOND_UUID" >>"$STATE/$command.log" 2>&1 || rc=1
  fi
  log "finished, status $rc"
}

revert() {
  load_change "${1:?usage: pifarm-network-revert STATE_DIR | --boot ROOT}"
  log "restoring the configuration saved before the last change"
  restore_files
  # Undoing the change releases the links it added to the bond.
  refresh_backends "$ADDED_LINKS"
  if nm_running; then
    # Connections that were active on the bond and its members before the change.
    for pair in $NM_ACTIVE; do
      log "NetworkManager: activating ${pair#*=} on ${pair%%=*} again"
      nmcli connection up uuid "${pair#*=}" ifname "${pair%%=*}" >>"$STATE/$command.log" 2>&1 || rc=1
    done
  fi
  log "finished, status $rc"
}

revert_at_boot() {
  for dir in "${1:?usage: pifarm-network-revert --boot ROOT}"/*/; do
    [ -e "${dir}pending" ] || continue
    load_change "${dir%/}"
    log "unconfirmed change found at boot: restoring it before networking starts"
    restore_files
  done
}

case $command in
  pifarm-network-apply) apply "$@" ;;
  pifarm-network-revert)
    if [ "${1:-}" = --boot ]; then
      shift
      revert_at_boot "$@"
    else
      revert "$@"
    fi
    ;;
  *)
    echo "run me as pifarm-network-apply or pifarm-network-revert, not $command" >&2
    exit 2
    ;;
esac
exit "$rc"
