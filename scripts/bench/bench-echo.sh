#!/usr/bin/env bash
# TLS echo server vs the same server with --plain, under the same load, side by side:
#   1. connection setups/s: connect, TLS handshake (none for plain), one 64-byte echo, close
#   2. echo round trips/s on open connections (64-byte messages)
#   3. bulk echo throughput (16 KiB messages)
# Release build; load from the bounded example `echo_load` (no dependency on ssl-echo-client).
# Runs one measurement at a time, all on 127.0.0.1. Tunables: BENCH_SECONDS, WORKERS,
# CONC_SETUP, CONC_ECHO, CONC_BULK, LOAD_THREADS.
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCH_SECONDS=${BENCH_SECONDS:-5}
WORKERS=${WORKERS:-2}
CONC_SETUP=${CONC_SETUP:-16}
CONC_ECHO=${CONC_ECHO:-50}
CONC_BULK=${CONC_BULK:-8}
LOAD_THREADS=${LOAD_THREADS:-1}

cargo build --release -q -p ssl-echo-server -p certs --bins --examples
bin=${CARGO_TARGET_DIR:-target}/release
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"$bin/certs" --out "$tmp/certs" >/dev/null

# start_server NAME [--plain]: starts on a free loopback port and sets SERVER_ADDR. Not run in a
# command substitution: that subshell's pids+=() would be lost and the server never stopped.
start_server() {
    local name=$1; shift
    "$bin/ssl-echo-server" --listen 127.0.0.1:0 --cert "$tmp/certs/server.crt" \
        --key "$tmp/certs/server.key" --workers "$WORKERS" --stats-interval 1 \
        --stats-file "$tmp/$name.json" --log-level warn "$@" >"$tmp/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        if [ -s "$tmp/$name.json" ]; then
            SERVER_ADDR=$(sed -n 's/.*"listen": "\(.*\)".*/\1/p' "$tmp/$name.json")
            return
        fi
        sleep 0.1
    done
    echo "server $name did not start:" >&2
    cat "$tmp/$name.log" >&2
    exit 1
}

start_server tls
tls_addr=$SERVER_ADDR
start_server plain --plain
plain_addr=$SERVER_ADDR

# Errors of every load, summed: any makes the script exit 1 after the table.
total_errors=0

# load OUT ADDR MODE CONCURRENCY SIZE [--plain]: runs one load and writes "rate p99_us errors" to
# OUT. The load tool's own messages are kept in OUT.log; a tool that fails or prints no RESULT line
# stops the script with them, instead of a row of zeros.
load() {
    local out=$1 addr=$2 mode=$3 conc=$4 size=$5; shift 5
    local rc=0
    "$bin/examples/echo_load" --addr "$addr" --ca "$tmp/certs/ca.crt" --mode "$mode" \
        --concurrency "$conc" --size "$size" --seconds "$BENCH_SECONDS" \
        --threads "$LOAD_THREADS" "$@" >"$out.raw" 2>"$out.log" || rc=$?
    awk '/^RESULT/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); r[kv[1]] = kv[2] }
                     print r["rate"], r["p99_us"], r["errors"] }' "$out.raw" >"$out"
    if [ "$rc" -ne 0 ] || ! [ -s "$out" ]; then
        echo "echo_load $mode on $addr failed (exit $rc$( [ -s "$out" ] || echo ', no RESULT line')):" >&2
        cat "$out.log" "$out.raw" >&2
        exit 1
    fi
}

row() {
    local label=$1 unit=$2 mode=$3 conc=$4 size=$5
    load "$tmp/tls.res" "$tls_addr" "$mode" "$conc" "$size"
    load "$tmp/plain.res" "$plain_addr" "$mode" "$conc" "$size" --plain
    read -r t_rate t_p99 t_err <"$tmp/tls.res"
    read -r p_rate p_p99 p_err <"$tmp/plain.res"
    for e in "$t_err" "$p_err"; do
        if ! [[ $e =~ ^[0-9]+$ ]]; then
            echo "echo_load gave no error count for \"$label\"" >&2
            exit 1
        fi
        total_errors=$((total_errors + e))
    done
    if [ "$t_err" -ne 0 ] || [ "$p_err" -ne 0 ]; then
        echo "errors in \"$label\" (TLS $t_err, plain $p_err); the load tool said:" >&2
        grep -v '^RESULT' "$tmp/tls.res.log" "$tmp/plain.res.log" | tail -20 >&2
    fi
    if [ "$unit" = "MB/s" ]; then
        t_rate=$(awk -v r="$t_rate" -v s="$size" 'BEGIN { printf "%.1f", r * s / 1e6 }')
        p_rate=$(awk -v r="$p_rate" -v s="$size" 'BEGIN { printf "%.1f", r * s / 1e6 }')
    fi
    ratio=$(awk -v a="$t_rate" -v b="$p_rate" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    printf '| %s | %.0f %s | %.0f %s | %s | %s / %s | %s / %s |\n' "$label" "$t_rate" "$unit" \
        "$p_rate" "$unit" "$ratio" "$t_p99" "$p_p99" "$t_err" "$p_err"
}

echo "ssl-echo-server benchmark: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $WORKERS workers, ${BENCH_SECONDS}s per run, load threads $LOAD_THREADS"
echo
echo "| load (same for both) | TLS | plain | TLS / plain | p99 µs TLS / plain | errors TLS / plain |"
echo "|---|---|---|---|---|---|"
row "connect + handshake + 64 B echo + close, $CONC_SETUP at a time" "setups/s" handshakes "$CONC_SETUP" 64
row "64 B echo round trips, $CONC_ECHO open connections" "round trips/s" echo "$CONC_ECHO" 64
row "16 KiB echo, $CONC_BULK open connections" "MB/s" echo "$CONC_BULK" 16384
if [ "$total_errors" -ne 0 ]; then
    echo "FAIL: $total_errors failed exchanges across the loads (see above); the rates above count only the good ones" >&2
    exit 1
fi
