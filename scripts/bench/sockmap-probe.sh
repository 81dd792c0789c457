#!/usr/bin/env bash
# Why sockmap's single-stream throughput is bimodal (docs/benchmarks.md): N short iperf3 runs
# through `forwarder --data-path sockmap`, each under `perf record -a` of two tracepoints, printing
# per run the throughput, how often and on which CPU the psock backlog work (sk_psock_backlog) ran,
# and how many one-jiffy delayed-work timers were armed (the backlog's retry after -EAGAIN from a
# full send buffer). Loopback only; bounded: at most 50 runs of at most 10 s. Needs root and perf.
#
# Usage: scripts/bench/sockmap-probe.sh [RUNS (6)] [SECONDS (2)]; PIN=CPU pins the iperf3 client.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=lib.sh
source scripts/bench/lib.sh

RUNS=${1:-6} SECS=${2:-2}
if ! [[ $RUNS =~ ^[0-9]+$ ]] || [ "$RUNS" -lt 1 ] || [ "$RUNS" -gt 50 ]; then echo "RUNS: 1 to 50" >&2; exit 2; fi
if ! [[ $SECS =~ ^[0-9]+$ ]] || [ "$SECS" -lt 1 ] || [ "$SECS" -gt 10 ]; then echo "SECONDS: 1 to 10" >&2; exit 2; fi
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 1; }
FORWARDER=${CARGO_TARGET_DIR:-$ROOT/target}/release/forwarder
[ -x "$FORWARDER" ] || { echo "$FORWARDER is missing: cargo build --release -p forwarder" >&2; exit 1; }

WORK=$(mktemp -d /tmp/sockmap-probe.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
BASE=$(pick_port_block)
SERVER=$BASE PROXY=$((BASE + 1))
printf 'i,%s,127.0.0.1,%s\n' "$PROXY" "$SERVER" >"$WORK/rules.csv"
start_bg "$WORK/iperf3.log" iperf3 -s -B 127.0.0.1 -p "$SERVER"
start_bg "$WORK/forwarder.log" "$FORWARDER" --rules "$WORK/rules.csv" --no-web --workers 2 \
    --data-path sockmap --log-level info
wait_port "$SERVER"
wait_port "$PROXY"
grep -q "data path: sockmap" "$WORK/forwarder.log" || { cat "$WORK/forwarder.log" >&2; exit 1; }

PINCMD=()
[ -z "${PIN:-}" ] || PINCMD=(taskset -c "$PIN")
for r in $(seq "$RUNS"); do
    timeout $((SECS + 20)) perf record -q -a -e workqueue:workqueue_execute_start -e timer:timer_start \
        -o "$WORK/perf.data" -- "${PINCMD[@]}" iperf3 -c 127.0.0.1 -p "$PROXY" -t "$SECS" -J \
        >"$WORK/run.json" 2>/dev/null || true
    perf script -i "$WORK/perf.data" 2>/dev/null >"$WORK/perf.txt" || true
    gbps=$(jq -r '(.end.sum_received.bits_per_second // 0) / 1e9' "$WORK/run.json" 2>/dev/null || echo 0)
    backlog=$(grep -c 'function sk_psock_backlog' "$WORK/perf.txt" || true)
    per_cpu=$(grep 'function sk_psock_backlog' "$WORK/perf.txt" | awk '{ print $3 }' | sort | uniq -c |
        awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $2, $1 }')
    retries=$(grep 'delayed_work_timer_fn' "$WORK/perf.txt" | grep -c '\[timeout=1\]' || true)
    printf 'run %s: %.1f Gbit/s (under perf) | sk_psock_backlog runs %s (%s) | one-jiffy delayed-work timers %s\n' \
        "$r" "$gbps" "$backlog" "$per_cpu" "$retries"
done
