#!/usr/bin/env bash
# The README's two-host walkthrough, for real, on one machine: site A and site B are two
# network namespaces joined by a veth pair (A 10.0.0.1, B 10.0.0.2), each running its daemon.
#
#   create -> PAIR; hosts write A; the copy on B; planned takeover (swap, exit 1): B primary;
#   hosts write B; site B lost (SIGKILL); takeover on A (SSWS, exit 2); hosts write A;
#   B back (PSUE: the secondary took over); resync --swap on A: A primary, B its secondary.
#
# Needs root (ip netns) and `make setup`. Usage: scripts/walkthrough.sh [WORKDIR]
# (default: a new temporary directory, removed at the end unless KEEP=1). Every command it
# runs is printed as "A$ ..." or "B$ ...", the site it stands for.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv/bin
WORK=${1:-}
REMOVE_WORK=0
if [ -z "$WORK" ]; then
	WORK=$(mktemp -d /tmp/journalpair-walkthrough.XXXXXX)
	REMOVE_WORK=1
fi
NS_A=jp-a-$$
NS_B=jp-b-$$
VETH_A=jpa$$
VETH_B=jpb$$
STEP_TIMEOUT_S=60

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'walkthrough FAILED: %s\n' "$*" >&2; show_logs; exit 1; }
show_logs() {
	for site in a b; do
		[ -f "$WORK/$site/daemon.log" ] || continue
		printf -- '--- site %s log (last 30 lines) ---\n' "$site" >&2
		tail -n 30 "$WORK/$site/daemon.log" >&2
	done
}

# on SITE: run a command in that site's namespace, printed as the site's prompt
on() {
	local site=$1
	shift
	local ns=$NS_A
	[ "$site" = B ] && ns=$NS_B
	printf '%s$ %s\n' "$site" "$*"
	ip netns exec "$ns" "$@"
}

pairctl_on() {
	local site=$1
	shift
	local config=$WORK/a/site.yaml
	[ "$site" = B ] && config=$WORK/b/site.yaml
	printf '%s$ pairctl --config %s %s\n' "$site" "$config" "$*"
	"$VENV/pairctl" --config "$config" "$@"
}

# pairctl with its exit status kept: takeover exits 1 (swap) or 2 (SSWS) when it worked
pairctl_status() {
	local status=0
	pairctl_on "$@" || status=$?
	return "$status"
}

field() { # field SITE EXPR: a value of `pairctl display --json` (python expression on d)
	local config=$WORK/a/site.yaml
	[ "$1" = B ] && config=$WORK/b/site.yaml
	"$VENV/pairctl" --config "$config" display --json 2>/dev/null |
		"$VENV/python" -c "import json, sys; d = json.load(sys.stdin); print($2)"
}

wait_for() { # wait_for WHAT COMMAND...: poll COMMAND until it succeeds, STEP_TIMEOUT_S at most
	local what=$1
	shift
	local deadline=$((SECONDS + STEP_TIMEOUT_S))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $deadline ] || fail "no $what within ${STEP_TIMEOUT_S} s"
		sleep 0.2
	done
}

link_is() { [ "$(field "$1" 'd["link"]["up"]')" = "$2" ]; }
role_state_is() { [ "$(field "$1" 'd["role"] + " " + d["state"]')" = "$2" ]; }
caught_up() { [ "$(field "$1" 'd["lag"]["entries"] == 0 and d["state"] == "PAIR"')" = True ]; }

start_site() { # start_site SITE: its daemon, in its namespace, logging to WORK/site/daemon.log
	local site=$1 dir ns program
	dir=$WORK/$(echo "$site" | tr AB ab)
	ns=$NS_A
	program=primaryd
	if [ "$site" = B ]; then
		ns=$NS_B
		program=secondaryd
	fi
	# A site keeps the role a swap gave it (pair.json): the program only picks the first one.
	printf '%s$ %s --config %s &\n' "$site" "$program" "$dir/site.yaml"
	ip netns exec "$ns" "$VENV/$program" --config "$dir/site.yaml" >>"$dir/daemon.log" 2>&1 &
	echo $! >"$dir/pid"
	disown  # killed on purpose later: no job-control notice
	wait_for "control socket of site $site" "$VENV/pairctl" --config "$dir/site.yaml" display
}

cleanup() {
	local status=$?
	for site in a b; do
		if [ -f "$WORK/$site/pid" ]; then
			kill "$(cat "$WORK/$site/pid")" 2>/dev/null || true
		fi
	done
	for site in a b; do
		if [ -f "$WORK/$site/pid" ]; then
			local pid
			pid=$(cat "$WORK/$site/pid")
			for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
			kill -9 "$pid" 2>/dev/null || true
		fi
	done
	ip netns delete "$NS_A" 2>/dev/null || true
	ip netns delete "$NS_B" 2>/dev/null || true
	if [ "$status" -eq 0 ] && [ "${KEEP:-0}" != 1 ] && [ "$REMOVE_WORK" -eq 1 ]; then
		rm -rf "$WORK"
	fi
	exit "$status"
}

[ "$(id -u)" -eq 0 ] || { echo "walkthrough: needs root (ip netns)" >&2; exit 2; }
[ -x "$VENV/primaryd" ] || { echo "walkthrough: run make setup first" >&2; exit 2; }
trap cleanup EXIT
mkdir -p "$WORK/a" "$WORK/b"

say "two sites: network namespaces $NS_A (10.0.0.1) and $NS_B (10.0.0.2), one veth link"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B"
ip -n "$NS_A" addr add 10.0.0.1/24 dev "$VETH_A"
ip -n "$NS_B" addr add 10.0.0.2/24 dev "$VETH_B"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up

say "the same shared secret on both sites (the link leaves the host: it must be authenticated)"
umask 077
"$VENV/python" -c "import secrets; print(secrets.token_hex(32))" >"$WORK/link.secret"
cp "$WORK/link.secret" "$WORK/a/link.secret"
cp "$WORK/link.secret" "$WORK/b/link.secret"
umask 022

write_config() { # write_config DIR ROLE ME OTHER
	cat >"$1/site.yaml" <<EOF
role: $2
group: jg0
data_dir: $1/data
listen: {nbd: $3:10809, replication: $3:7410}
primary: $4:7410
control: $1/control.sock
journal: {capacity: 64MiB}
link: {secret_file: $1/link.secret}
pair: {path_watch_s: 5}
volumes:
  - {name: vol0, path: $1/vol0.img, size: 64MiB}
EOF
}
write_config "$WORK/a" primary 10.0.0.1 10.0.0.2
write_config "$WORK/b" secondary 10.0.0.2 10.0.0.1
cat "$WORK/a/site.yaml"

say "start both daemons; B connects to A"
start_site A
start_site B
wait_for "the link from B to A" link_is B True

say "create the pair: the initial copy, then PAIR"
pairctl_on A create
pairctl_on A wait PAIR --timeout "$STEP_TIMEOUT_S"

say "hosts write site A; the copy reaches B, read there read-only"
on A qemu-io -f raw -c "write -P 0xa1 0 1M" nbd://10.0.0.1:10809/vol0 >/dev/null
wait_for "B to apply A's writes" caught_up A
on B qemu-io -r -f raw -c "read -P 0xa1 0 1M" nbd://10.0.0.2:10809/vol0 >/dev/null
pairctl_on B display

say "planned switch-over: takeover on B while A answers (swap, exit 1)"
status=0
pairctl_status B takeover || status=$?
[ "$status" -eq 1 ] || fail "takeover (swap) exited $status, not 1"
wait_for "B to be the primary" role_state_is B "primary PAIR"
wait_for "A to be the secondary" role_state_is A "secondary PAIR"
on B qemu-io -f raw -c "write -P 0xb2 1M 1M" nbd://10.0.0.2:10809/vol0 >/dev/null
wait_for "A to apply B's writes" caught_up B

say "disaster: site B is lost (its daemon killed); takeover on A (SSWS, exit 2)"
printf 'B$ kill -9 %s\n' "$(cat "$WORK/b/pid")"
kill -9 "$(cat "$WORK/b/pid")"
wait_for "A to see the link down" link_is A False
status=0
pairctl_status A takeover || status=$?
[ "$status" -eq 2 ] || fail "takeover (SSWS) exited $status, not 2"
on A qemu-io -f raw -c "read -P 0xb2 1M 1M" -c "write -P 0xc3 2M 1M" \
	nbd://10.0.0.1:10809/vol0 >/dev/null

say "site B comes back: still the primary of the old pair, PSUE (the secondary took over)"
start_site B
wait_for "B to learn that A took over" role_state_is B "primary PSUE"
pairctl_on B display

say "resync --swap on A: A becomes the primary and copies what changed to B"
wait_for "A's link to B" link_is A True
pairctl_on A resync --swap
wait_for "A to be the primary" role_state_is A "primary PAIR"
wait_for "B to be the secondary" role_state_is B "secondary PAIR"
wait_for "B to apply everything" caught_up A
on B qemu-io -r -f raw -c "read -P 0xa1 0 1M" -c "read -P 0xb2 1M 1M" -c "read -P 0xc3 2M 1M" \
	nbd://10.0.0.2:10809/vol0 >/dev/null
pairctl_on A display
cmp "$WORK/a/vol0.img" "$WORK/b/vol0.img" || fail "the volumes differ"
echo "A and B hold the same vol0"
say "walkthrough done"
