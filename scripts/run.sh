#!/usr/bin/env bash
# make run: both daemons in the foreground on loopback, output prefixed [primary]/[secondary].
#
#   start primaryd, secondaryd ──► wait for the NBD ports and the link ──► pairctl create
#   (when SMPL) ──► pairctl wait PAIR
#        │                                                         │
#        └── Ctrl-C / SIGTERM: SIGTERM to both, wait (SIGKILL after STOP_TIMEOUT_S) ◄──┘
#            a daemon exiting on its own stops the other one too
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
PRIMARY_CONFIG="${PRIMARY_CONFIG:-configs/primary.yaml}"
SECONDARY_CONFIG="${SECONDARY_CONFIG:-configs/secondary.yaml}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-30}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"
PRIMARYD="${PRIMARYD:-$VENV/bin/primaryd}"
SECONDARYD="${SECONDARYD:-$VENV/bin/secondaryd}"

log() { echo "run: $*" >&2; }

for cfg in "$PRIMARY_CONFIG" "$SECONDARY_CONFIG"; do
    if [[ ! -f "$cfg" ]]; then
        log "error: $cfg not found"
        exit 1
    fi
done

# Print "host:port" of listen.nbd, and the volume names, from a config. The daemons validate
# the config themselves; this only reads what the messages below need.
config_nbd() {
    "$VENV/bin/python" - "$1" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f) or {}
print((cfg.get("listen") or {}).get("nbd", "127.0.0.1:10809"))
EOF
}

# Print "host:port" of iscsi.listen and the target name, or nothing when iSCSI is off.
config_iscsi() {
    "$VENV/bin/python" - "$1" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f) or {}
iscsi = cfg.get("iscsi") or {}
if iscsi.get("listen"):
    group = str(cfg.get("group", "jg0")).lower().replace("_", "-")
    print(iscsi["listen"], iscsi.get("iqn") or f"iqn.2026-01.org.journalpair:{group}")
EOF
}

config_volumes() {
    "$VENV/bin/python" - "$1" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f) or {}
for vol in cfg.get("volumes") or []:
    print(vol.get("name", "?"))
EOF
}

PIDS=()
NAMES=()

# start NAME CMD...: run CMD in the background with its output prefixed by [NAME].
# Background jobs of a script ignore SIGINT; the prefixer ignores INT/TERM too, so it drains
# the daemon's last lines (it ends at EOF, when the daemon exits).
start() {
    local name=$1
    shift
    "$@" > >(trap '' INT TERM; exec sed -u "s/^/[$name] /") 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
    log "started $name (pid $!): $*"
}

alive() { kill -0 "$1" 2>/dev/null; }

stop_all() {
    local pid i deadline=$((SECONDS + STOP_TIMEOUT_S))
    for pid in "${PIDS[@]}"; do
        alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
    done
    for i in "${!PIDS[@]}"; do
        pid=${PIDS[$i]}
        while alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if alive "$pid"; then
            log "${NAMES[$i]} did not stop within ${STOP_TIMEOUT_S}s of SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    sleep 0.2 # let the prefixers print the daemons' last lines
}

on_signal() {
    trap '' INT TERM
    log "stopping both daemons"
    stop_all
    log "stopped"
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

tcp_accepts() {
    local host=${1%:*} port=${1##*:}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# wait_port NAME ADDR: true once ADDR accepts, false on timeout or if a daemon died.
wait_port() {
    local name=$1 addr=$2 deadline=$((SECONDS + READY_TIMEOUT_S)) pid
    until tcp_accepts "$addr"; do
        for pid in "${PIDS[@]}"; do
            alive "$pid" || return 1
        done
        if ((SECONDS >= deadline)); then
            log "$name: $addr does not accept connections after ${READY_TIMEOUT_S}s"
            return 1
        fi
        sleep 0.1
    done
}

# pair_field FIELD: one field of `pairctl display --json` on the primary ("" if unreachable).
pair_field() {
    "$VENV/bin/pairctl" --config "$PRIMARY_CONFIG" display --json 2>/dev/null |
        "$VENV/bin/python" -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {}, d))' "$1" 2>/dev/null || true
}

# try_pair: once the secondary is connected, create the pair if it is not paired yet (the pair
# state persists in data_dir, so a second `make run` finds it PAIR and leaves it alone).
try_pair() {
    local deadline=$((SECONDS + READY_TIMEOUT_S)) state
    until [[ "$(pair_field 'link["up"]')" == "True" ]]; do
        if ((SECONDS >= deadline)); then
            log "warning: the secondary did not connect within ${READY_TIMEOUT_S}s; running unpaired"
            return 0
        fi
        sleep 0.2
    done
    state=$(pair_field state)
    if [[ "$state" != "SMPL" ]]; then
        log "pair already exists: $state (pairctl --config $PRIMARY_CONFIG display)"
        return 0
    fi
    if "$VENV/bin/pairctl" --config "$PRIMARY_CONFIG" create; then
        "$VENV/bin/pairctl" --config "$PRIMARY_CONFIG" wait PAIR --timeout 600 &&
            log "pair is PAIR: $PRIMARY_CONFIG's volumes replicate to $SECONDARY_CONFIG's"
    else
        log "warning: 'pairctl --config $PRIMARY_CONFIG create' failed; running unpaired"
    fi
}

print_usage() {
    local addr=$1 vol
    local -a vols
    mapfile -t vols < <(config_volumes "$PRIMARY_CONFIG")
    [[ ${#vols[@]} -eq 0 ]] && vols=(vol0)
    vol=${vols[0]}
    cat >&2 <<EOF

run: primaryd serves ${vols[*]} on nbd://$addr/<volume>. Point a client at it:
  nbdinfo nbd://$addr/$vol
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://$addr/$vol
  qemu-img convert -p -n -O raw disk.img nbd://$addr/$vol
  fio --name=t --ioengine=nbd --uri=nbd://$addr/$vol --rw=randwrite --bs=4k --iodepth=32 \\
      --runtime=10 --time_based
Watch the pair:
  $VENV/bin/pairctl --config $PRIMARY_CONFIG display --watch
  $VENV/bin/pairctl --config $SECONDARY_CONFIG display
  $VENV/bin/pairctl --config $PRIMARY_CONFIG events --follow
The secondary serves its read-only copy on nbd://$(config_nbd "$SECONDARY_CONFIG")/<volume>.
EOF
    local iscsi iqn
    read -r iscsi iqn < <(config_iscsi "$PRIMARY_CONFIG") || true
    if [[ -n ${iscsi:-} ]]; then
        cat >&2 <<EOF
iSCSI: target $iqn on $iscsi, LUN n = the n-th volume:
  iscsi-ls -s iscsi://$iscsi
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' iscsi://$iscsi/$iqn/0
EOF
    fi
    echo "Ctrl-C stops both daemons." >&2
    echo >&2
}

main() {
    local p_addr s_addr status
    p_addr=$(config_nbd "$PRIMARY_CONFIG")
    s_addr=$(config_nbd "$SECONDARY_CONFIG")
    start primary "$PRIMARYD" --config "$PRIMARY_CONFIG"
    start secondary "$SECONDARYD" --config "$SECONDARY_CONFIG"
    if wait_port primary "$p_addr"; then
        wait_port secondary "$s_addr" || log "warning: secondary not accepting on $s_addr"
        try_pair
        print_usage "$p_addr"
    fi
    # Run until either daemon exits, then stop the other and exit with the first one's status.
    status=0
    wait -n "${PIDS[@]}" || status=$?
    trap '' INT TERM
    log "a daemon exited (status $status); stopping the other"
    stop_all
    exit "$status"
}

main "$@"
