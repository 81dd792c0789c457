#!/usr/bin/env bash
# Start-up time and memory of a forwarder with one large port range, in a network namespace of its
# own (frs-bench-$$, so the nftables steering touches nothing else): steered (20,000 ports, root)
# and port by port (15,000 ports under --user nobody, which has no CAP_NET_ADMIN for nftables).
# Start-up time is from exec until a connection through the range's last port is answered; RSS is
# the supervisor's and the workers' VmRSS summed then. Needs root.
#
# Usage: scripts/bench/range-startup.sh [WORKERS]   (FORWARDER, default target/release/forwarder)
set -euo pipefail

WORKERS=${1:-2}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FORWARDER=${FORWARDER:-$ROOT/target/release/forwarder}
[ -x "$FORWARDER" ] || { echo "range-startup: $FORWARDER is missing" >&2; exit 1; }
NS=frs-bench-$$
WORK=$(mktemp -d /tmp/range-startup.XXXXXX)
chmod 755 "$WORK"
cleanup() {
    for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
# A backend that answers every connection with one line.
ip netns exec "$NS" python3 -c '
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000)); s.listen(1024)
while True:
    c, _ = s.accept(); c.sendall(b"ok\n"); c.close()
' &

answers() {
    ip netns exec "$NS" python3 -c '
import socket, sys
try:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
    sys.exit(0 if c.recv(3) == b"ok\n" else 1)
except Exception:
    sys.exit(1)
' "$1"
}

run() {
    local label=$1 first=$2 last=$3
    shift 3
    echo "r,$first-$last,127.0.0.1,9000" >"$WORK/entries.csv"
    chmod 644 "$WORK/entries.csv"
    local start end pid rss=0 p
    start=$(date +%s.%N)
    ip netns exec "$NS" "$FORWARDER" --rules "$WORK/entries.csv" --no-web --workers "$WORKERS" \
        "$@" >"$WORK/$label.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        answers "$last" && break
        sleep 0.05
    done
    end=$(date +%s.%N)
    answers "$last" || { echo "$label: port $last never answered" >&2; tail "$WORK/$label.log" >&2; exit 1; }
    for p in "$pid" $(pgrep -P "$pid"); do
        rss=$((rss + $(awk '/^VmRSS/ { print $2 }' "/proc/$p/status")))
    done
    local fds
    fds=$(for p in $(pgrep -P "$pid"); do find "/proc/$p/fd" -mindepth 1 -maxdepth 1 | wc -l; done | tr '\n' ' ')
    printf '%-34s start-up %.2f s, RSS %d MiB (supervisor + %s workers), descriptors per worker: %s\n' \
        "$label" "$(echo "$end - $start" | bc)" $((rss / 1024)) "$WORKERS" "$fds"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

run "20,000 ports, steered" 20000 39999
run "15,000 ports, port by port" 20000 34999 --user nobody
