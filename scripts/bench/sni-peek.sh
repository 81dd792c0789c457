#!/usr/bin/env bash
# What the SNI peek costs per TLS connection: one forwarder build, two forwarders side by side in
# front of one ssl-echo-server, A with a plain rule, B with the same rule carrying `sni=localhost`
# (so B peeks at every ClientHello before it connects). ssl-echo-client opens N TLS connections
# (one message each) through A, then B, alternating for ROUNDS rounds so a shared machine's noise
# falls on both alike. Prints each side's forwarder CPU per connection (workers' CPU time from schedstat,
# median over the rounds) and B/A.
#
# Usage: scripts/bench/sni-peek.sh [ROUNDS] [CONNECTIONS]
#   FORWARDER (default target/release/forwarder), ECHO_BIN_DIR (default target/debug) for
#   ssl-echo-server, ssl-echo-client and certs.
set -euo pipefail

ROUNDS=${1:-6}
N=${2:-400}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=lib.sh
source "$ROOT/scripts/bench/lib.sh"
FORWARDER=${FORWARDER:-$ROOT/target/release/forwarder}
BIN=${ECHO_BIN_DIR:-$ROOT/target/debug}
for f in "$FORWARDER" "$BIN/ssl-echo-server" "$BIN/ssl-echo-client" "$BIN/certs"; do
    [ -x "$f" ] || { echo "sni-peek: $f is missing" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/sni-peek.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
BASE=$(pick_port_block)
ECHO=$BASE
declare -A PORT=([a]=$((BASE + 1)) [b]=$((BASE + 2)))
declare -A OPTS=([a]="" [b]=",sni=localhost")
declare -A PID

"$BIN/certs" --out "$WORK/certs" >/dev/null 2>&1
start_bg "$WORK/echo.log" "$BIN/ssl-echo-server" --listen "127.0.0.1:$ECHO" \
    --cert "$WORK/certs/server.crt" --key "$WORK/certs/server.key" --workers 1
wait_listen "$ECHO"
for v in a b; do
    echo "p,${PORT[$v]},127.0.0.1,$ECHO${OPTS[$v]}" >"$WORK/$v.csv"
    start_bg "$WORK/$v.log" "$FORWARDER" --rules "$WORK/$v.csv" --no-web --workers 1
    PID[$v]=$BG_PID
    wait_listen "${PORT[$v]}"
done

# CPU time of every thread of every child (worker) of supervisor $1, in ns (schedstat: clock
# ticks are 10 ms, too coarse for a few hundred connections).
worker_ns() {
    local sup=$1 total=0 pid t
    for pid in $(pgrep -P "$sup"); do
        for t in /proc/"$pid"/task/*/schedstat; do
            total=$((total + $(awk '{ print $1 }' "$t")))
        done
    done
    echo "$total"
}

declare -A PER
for round in $(seq "$ROUNDS"); do
    for v in a b; do
        before=$(worker_ns "${PID[$v]}")
        "$BIN/ssl-echo-client" --port "${PORT[$v]}" --connections "$N" --count 1 \
            --ca "$WORK/certs/ca.crt" --server-name localhost --processes 1 \
            --report "$WORK/report-$v-$round.xlsx" >"$WORK/client-$v.log" 2>&1 ||
            { echo "sni-peek: client run failed:" >&2; tail -5 "$WORK/client-$v.log" >&2; exit 1; }
        after=$(worker_ns "${PID[$v]}")
        us=$(awk -v t=$((after - before)) -v n="$N" 'BEGIN { printf "%.1f", t / 1000 / n }')
        PER[$v]+="$us"$'\n'
        wait_quiet "${PORT[$v]}"
    done
    echo "round $round: A $(echo -n "${PER[a]}" | tail -1) µs/conn, B $(echo -n "${PER[b]}" | tail -1) µs/conn"
done
a=$(echo -n "${PER[a]}" | median)
b=$(echo -n "${PER[b]}" | median)
echo "forwarder CPU per TLS connection (median of $ROUNDS rounds of $N): plain $(fmt "$a") µs, sni= $(fmt "$b") µs, B/A $(ratio "$b" "$a")"
