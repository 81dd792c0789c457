#!/usr/bin/env bash
# Reproduces a starved machine: 20,000 TLS connections through the forwarder to two echo servers
# while BUSY_LOOPS busy-loop processes compete for the cores. Prints the client's summary and each
# server's handshake counters: a handshake the client finished must never be dropped by a server
# (client `eof` errors matching server handshake timeouts showed that the two deadlines raced).
# Bounded: the busy loops end after 200 s, the client after 180 s; everything started is stopped.
#
#   scripts/dev/overload-client.sh              # BUSY_LOOPS=10 CONNECTIONS=20000 BASE_PORT=29100
#   KEEP=1 scripts/dev/overload-client.sh       # keep the report, logs and stats files
set -euo pipefail
cd "$(dirname "$0")/../.."

BUSY_LOOPS=${BUSY_LOOPS:-10}
CONNECTIONS=${CONNECTIONS:-20000}
BASE_PORT=${BASE_PORT:-29100}
cargo build --release -q -p forwarder -p ssl-echo-server -p ssl-echo-client -p certs
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

"$bin/certs" --out "$work/certs" >/dev/null
for i in 1 2; do
    "$bin/ssl-echo-server" --listen "127.0.0.1:$((BASE_PORT + i))" --cert "$work/certs/server.crt" \
        --key "$work/certs/server.key" --stats-interval 1 --stats-file "$work/server$i.json" \
        --log-level warn >"$work/server$i.log" 2>&1 &
    pids+=($!)
done
printf 'echo,127.0.0.1:%s,127.0.0.1,%s\necho,127.0.0.1:%s,127.0.0.1,%s\n' \
    "$BASE_PORT" $((BASE_PORT + 1)) "$BASE_PORT" $((BASE_PORT + 2)) >"$work/rules.csv"
"$bin/forwarder" --rules "$work/rules.csv" --no-web --log-level warn >"$work/forwarder.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    [ -s "$work/server1.json" ] && [ -s "$work/server2.json" ] &&
        grep -q ":$(printf '%04X' "$BASE_PORT") 00000000:0000 0A" /proc/net/tcp && break
    sleep 0.1
done

for _ in $(seq "$BUSY_LOOPS"); do
    timeout 200 sh -c 'while :; do :; done' &
    pids+=($!)
done
timeout 180 "$bin/ssl-echo-client" --port "$BASE_PORT" --connections "$CONNECTIONS" --duration 10 \
    --ca "$work/certs/ca.crt" --report "$work/report.xlsx" >/dev/null || true
for i in 1 2; do
    printf 'server%s: ' "$i"
    jq -c '{connections_total, handshakes_total, handshake_timeouts, handshake_failures}' "$work/server$i.json"
done
