#!/usr/bin/env bash
# Load benchmark with ssl-echo-client (release): 1,000 and 20,000 TLS connections for 15 s each,
# directly against ssl-echo-server and through the forwarder with two ssl-echo-server backends,
# printed next to the original lab's figures (20,000 connections: 771,047 messages in 15 s,
# 411 ms average response). Client, forwarder and servers all share this machine.
#
#   scripts/bench/bench-client.sh                 # both sizes, both paths
#   SIZES=1000 DURATION=5 scripts/bench/bench-client.sh
#
# Env: SIZES ("1000 20000"), DURATION (15), BASE_PORT (28005; uses BASE_PORT..BASE_PORT+2),
# OUT (target/bench-client: JSON summaries and xlsx reports), CARGO_TARGET_DIR, PATHS ("direct
# forwarder"), CLIENT_BIN (another ssl-echo-client build to measure, e.g. the one before a
# change, against the same servers).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
ensure_apt_packages jq time

SIZES=${SIZES:-"1000 20000"}
DURATION=${DURATION:-15}
BASE_PORT=${BASE_PORT:-28005}
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/bench-client}
BIN=$TARGET/release
CLIENT=${CLIENT_BIN:-$BIN/ssl-echo-client}

# The original lab's 20,000-connection figures.
ORIG_MESSAGES=771047
ORIG_SECONDS=15
ORIG_AVG_MS=411

cargo build --release -q -p ssl-echo-client -p ssl-echo-server -p forwarder -p certs
mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
cleanup() {
    # SIGTERM to each supervisor only (it stops its own workers; a signal to the whole group
    # would make it restart workers it sees exit), then SIGKILL to whatever is left of the group.
    # Last started first: the forwarder goes before its backends.
    local i pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    done
    for pid in "${pids[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts a program in its own process group (so its worker processes are stopped with it).
start() {
    setsid "$@" &
    pids+=($!)
}

# CPU time (user + system, in 1/100 s) used so far by every process of process group $1.
cpu_ticks() {
    local total=0 pid t
    for pid in $(pgrep -g "$1"); do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

# CPU ticks of all servers (and the forwarder) together.
peer_ticks() {
    local total=0 pid
    for pid in "${pids[@]}"; do
        total=$((total + $(cpu_ticks "$pid")))
    done
    echo "$total"
}

"$BIN/certs" --out "$work/certs" >/dev/null
echo_a=$BASE_PORT
echo_b=$((BASE_PORT + 1))
fwd=$((BASE_PORT + 2))
for port in "$echo_a" "$echo_b"; do
    start "$BIN/ssl-echo-server" --listen "127.0.0.1:$port" --cert "$work/certs/server.crt" \
        --key "$work/certs/server.key" --max-connections 20000 --log-level warn \
        --stats-interval 3600
done
wait_port "$echo_a"
wait_port "$echo_b"

# The forwarder runs are half of what this benchmark is for: a forwarder that cannot even print
# its help is a failure to report, never a reason to quietly measure only the direct path.
if ! help_out=$("$BIN/forwarder" --help 2>&1); then
    echo "FAIL: $BIN/forwarder --help failed; cannot measure the forwarder path:" >&2
    echo "$help_out" >&2
    exit 1
fi
printf 'bench,127.0.0.1:%s,127.0.0.1,%s\nbench,127.0.0.1:%s,127.0.0.1,%s\n' \
    "$fwd" "$echo_a" "$fwd" "$echo_b" >"$work/rules.csv"
start "$BIN/forwarder" --rules "$work/rules.csv" --no-web --log-level warn
wait_port "$fwd"
paths=${PATHS:-"direct forwarder"}

run() {
    local path=$1 size=$2 port=$3
    local name="$path-$size"
    echo "== $name: $size connections for ${DURATION} s ==" >&2
    local before after
    before=$(peer_ticks)
    /usr/bin/time -f '%U %S' -o "$OUT/$name.time" \
        "$CLIENT" --port "$port" --ca "$work/certs/ca.crt" --connections "$size" \
        --duration "$DURATION" --max-errors "$size" --report "$OUT/client-$name.xlsx" --json >"$OUT/$name.json"
    after=$(peer_ticks)
    # (--max-errors: failures are figures here, printed below, not a reason to stop the benchmark.)
    # CPU seconds of the whole run (handshakes included): client (with its worker processes),
    # and servers + forwarder. On a shared machine this is the fair measure: messages per CPU
    # second do not depend on what else runs.
    awk -v peers=$((after - before)) '{printf "%.2f %.2f\n", $1 + $2, peers / 100}' \
        "$OUT/$name.time" >"$OUT/$name.cpu"
}

for size in $SIZES; do
    run direct "$size" "$echo_a"
    if [[ $paths == *forwarder* ]]; then
        run forwarder "$size" "$fwd"
    fi
done

orig_rate=$(jq -n "$ORIG_MESSAGES / $ORIG_SECONDS")
echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs" >&2
printf '\n%-10s %6s %5s %10s %10s %8s %8s %8s %8s %8s %7s %9s %9s %8s %8s %10s %9s %6s %6s\n' \
    path conns procs messages "msg/s" "avg ms" "p50" "p90" "p99" "max" errors "x orig/s" "orig avg" \
    "cli cpu" "srv cpu" "msg/cpu-s" "cli us/msg" "jain" "min/c"
for size in $SIZES; do
    for path in $paths; do
        f="$OUT/$path-$size.json"
        read -r cli_cpu peer_cpu <"$OUT/$path-$size.cpu"
        jq -r --arg cli "$cli_cpu" --arg peer "$peer_cpu" --argjson orig "$orig_rate" --argjson origavg "$ORIG_AVG_MS" --arg path "$path" '
            [$path, .connections, .processes, .messages, (.messages_per_sec|floor),
             (.response_ms.avg*100|round/100), (.response_ms.p50*100|round/100),
             (.response_ms.p90*100|round/100), (.response_ms.p99*100|round/100),
             (.response_ms.max*100|round/100), .errors_total,
             ((.messages_per_sec / $orig * 100|round) / 100),
             (if .connections == 20000 then $origavg else "-" end),
             $cli, $peer,
             ((.messages / (($cli|tonumber) + ($peer|tonumber))) | floor),
             (if .messages > 0 then (($cli|tonumber) * 1e6 / .messages * 10 | round) / 10 else "-" end),
             (if .fairness then (.fairness.jain * 1000 | round) / 1000 else "-" end),
             (if .fairness then .fairness.min else "-" end)] | @tsv' "$f" |
            awk -F'\t' '{printf "%-10s %6s %5s %10s %10s %8s %8s %8s %8s %8s %7s %9s %9s %8s %8s %10s %9s %6s %6s\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19}'
    done
done
printf '%-10s %6s %5s %10s %10s %8s\n' original 20000 "?" "$ORIG_MESSAGES" "$(printf '%.0f' "$orig_rate")" "$ORIG_AVG_MS"
echo "reports and JSON summaries: $OUT" >&2
