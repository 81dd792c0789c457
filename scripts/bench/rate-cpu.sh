#!/usr/bin/env bash
# What a bandwidth limit costs below its limit: one forwarder (1 worker) with two pools in front of
# one sink, `plain` without options and `limited` with conn_rate_up=100g (a limit never reached,
# so every read still asks its bucket and charges it). The same sender pushes SIZE_MB through
# each in turn, alternating, ROUNDS times; the worker's CPU time (utime + stime from /proc) per
# GiB is compared, median against median. The issue's bar: at most 1.10.
#
# Usage: scripts/bench/rate-cpu.sh [ROUNDS] [SIZE_MB]   (BUILD=0 to use the release binaries as built;
#        BENCH_FORWARDER=path to measure another build)
set -euo pipefail
ROUNDS=${1:-6}
SIZE_MB=${2:-1024}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=lib.sh
source "$ROOT/scripts/bench/lib.sh"
release_binaries rate-cpu

WORK=$(mktemp -d /tmp/rate-cpu.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
BASE=$(pick_port_block)
SINK=$BASE PLAIN=$((BASE + 1)) LIMITED=$((BASE + 2))
cat >"$WORK/sink.py" <<'PY'
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(64)
def drain(c):
    while c.recv(1 << 20): pass
    c.close()
while True:
    c, _ = l.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
PY
cat >"$WORK/send.py" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])): s.sendall(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
PY
start_bg "$WORK/sink.log" python3 "$WORK/sink.py" "$SINK"
wait_listen "$SINK"
printf 'plain,%s,127.0.0.1,%s\nlimited,%s,127.0.0.1,%s,conn_rate_up=100g\n' \
    "$PLAIN" "$SINK" "$LIMITED" "$SINK" >"$WORK/rules.csv"
start_bg "$WORK/fwd.log" "$FORWARDER" --rules "$WORK/rules.csv" --no-web --workers 1
wait_listen "$PLAIN"
wait_listen "$LIMITED"
worker=$(pgrep -P "$BG_PID" | head -1)
[ -n "$worker" ] || { echo "rate-cpu: no worker process" >&2; exit 1; }
ticks() { awk '{ print $14 + $15 }' "/proc/$worker/stat"; }
hz=$(getconf CLK_TCK)
declare -A runs=([plain]="" [limited]="")
for ((r = 1; r <= ROUNDS; r++)); do
    for side in plain limited; do
        port=$PLAIN
        [ "$side" = limited ] && port=$LIMITED
        before=$(ticks)
        python3 "$WORK/send.py" "$port" "$SIZE_MB"
        after=$(ticks)
        ms=$(awk -v t=$((after - before)) -v hz="$hz" -v mb="$SIZE_MB" 'BEGIN { printf "%.1f", t * 1000 / hz * 1024 / mb }')
        runs[$side]="${runs[$side]} $ms"
        echo "round $r $side: $ms ms of worker CPU per GiB" >&2
    done
done
p=$(tr ' ' '\n' <<<"${runs[plain]}" | grep . | median)
l=$(tr ' ' '\n' <<<"${runs[limited]}" | grep . | median)
echo "plain $p ms/GiB, limited below its limit $l ms/GiB: limited/plain $(ratio "$l" "$p")"
