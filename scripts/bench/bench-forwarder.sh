#!/usr/bin/env bash
# Forwarder benchmark: direct loopback vs our forwarder vs HAProxy (mode tcp, 2 threads,
# option splice-auto) vs nginx stream (2 workers), side by side in one run, on 127.0.0.1 only.
#
# Loads (each bounded in count and time, run for every target in turn, repeated --rounds times with
# the median kept): bulk throughput with 1 and 8 streams (iperf3); ping-pong latency p50/p99 (our
# bench-load tool, all targets alternating in 50 ms slices; sockperf as a cross-check); new
# connections per second (connect, 64-byte request, echo, close); closed-loop 64-byte
# request/response over 1,000 connections; RSS per idle connection at 10,000 connections. For every load, the proxy's own CPU time (all its processes
# and threads, from /proc/<pid>/task/*/schedstat) per MB, per connection, per message.
#
# Usage: scripts/bench/bench-forwarder.sh [--quick] [--rounds N] [--seconds S] [--idle-connections N]
#                                   [--out FILE] [--keep] [--no-build] [--from DIR]
#        scripts/bench/bench-forwarder.sh --udp [...]   UDP instead: direct vs ours vs nginx stream vs
#                                                 socat vs rinetd (scripts/bench/udp.sh)
#        scripts/bench/bench-forwarder.sh --bulk [...]   iperf3 1 and 8 streams: direct vs ours copy/
#                                                 splice/auto vs nginx vs HAProxy (scripts/bench/bulk.sh)
#        scripts/bench/bench-forwarder.sh --data-path-compare [...]   direct vs --data-path splice vs
#                                                 sockmap, distributions (scripts/bench/data-path.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = --udp ]; then
    shift
    exec bash scripts/bench/udp.sh "$@"
fi
if [ "${1:-}" = --bulk ]; then
    shift
    exec bash scripts/bench/bulk.sh "$@"
fi
if [ "${1:-}" = --data-path-compare ]; then
    shift
    exec bash scripts/bench/data-path.sh "$@"
fi
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh
# shellcheck source=scripts/bench/report.sh
source scripts/bench/report.sh

usage() {
    cat <<'EOF'
Usage: scripts/bench/bench-forwarder.sh [options]
  --quick                 1 round of 2 s loads, 2,000 idle connections (about 1 minute)
  --rounds N              repeat every load N times, interleaved, and keep the median [3]
  --seconds S             length of each load [5]
  --idle-connections N    idle connections opened through each proxy [10000]
  --rr-connections N      connections of the request/response load [1000]
  --out FILE              also write the result table (markdown) to FILE
  --keep                  keep the work directory (configs, logs, raw results)
  --no-build              use the release binaries already built
  --from DIR              print the table again from a kept work directory, run nothing
  --udp [--help]          the UDP comparison instead (its own options: --udp --help)
  --bulk [--help]         bulk only, ours copy/splice/auto beside nginx and HAProxy (scripts/bench/bulk.sh)
  --data-path-compare [--help]
                          direct vs the forwarder's splice and sockmap data paths, ≥ 20
                          alternating single-stream runs each (its own options: --help)
Environment: CARGO_TARGET_DIR (where the release binaries are), BENCH_COMMIT (the commit named in
the table when the tree is not a git checkout).
EOF
}

QUICK=0 ROUNDS="" SECS="" IDLE="" RR_CONNS=1000 OUT="" KEEP=0 BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --seconds) SECS=$2; shift ;;
    --idle-connections) IDLE=$2; shift ;;
    --rr-connections) RR_CONNS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    --from) report "$2"; exit 0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-forwarder: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1} SECS=${SECS:-2} IDLE=${IDLE:-2000}
else
    ROUNDS=${ROUNDS:-3} SECS=${SECS:-5} IDLE=${IDLE:-10000}
fi
for v in ROUNDS SECS IDLE RR_CONNS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -eq 0 ]; then
        echo "bench-forwarder: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
[ "$IDLE" -le 18000 ] || { echo "bench-forwarder: --idle-connections above 18000 cannot fit the 20,000 open-file limit of the load tool" >&2; exit 2; }

say() { echo "bench-forwarder: $*" >&2; }

# ---- tools and binaries --------------------------------------------------------------------------
ensure_apt_packages iperf3 sockperf haproxy nginx libnginx-mod-stream jq iproute2
release_binaries bench-forwarder

WORK=$(mktemp -d /tmp/bench-forwarder.XXXXXX)
mkdir -p "$WORK/res" "$WORK/raw" "$WORK/nginx"
cleanup() {
    stop_all
    if [ "$KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- ports and processes -------------------------------------------------------------------------
BASE=$(pick_port_block)
IPERF=$BASE ECHO=$((BASE + 1)) SOCKPERF=$((BASE + 2))
TARGETS=(direct ours haproxy nginx)
declare -A OFFSET=([direct]=0 [ours]=10 [haproxy]=20 [nginx]=30)
declare -A PID=([direct]="")
declare -A LABEL=([direct]=direct [ours]=forwarder [haproxy]=HAProxy [nginx]=nginx)
port_of() { # target service
    local base
    case $2 in iperf) base=$IPERF ;; echo) base=$ECHO ;; sockperf) base=$SOCKPERF ;; esac
    echo $((base + ${OFFSET[$1]}))
}
listen_vars() { # target -> template variables
    echo "LISTEN_IPERF=$(port_of "$1" iperf)" "LISTEN_ECHO=$(port_of "$1" echo)" \
        "LISTEN_SOCKPERF=$(port_of "$1" sockperf)" "IPERF=$IPERF" "ECHO=$ECHO" "SOCKPERF=$SOCKPERF" "WORK=$WORK"
}

# HAProxy: 2 descriptors per connection and per pipe must fit 20,000; 256 pipes as our 2 workers.
HA_MAXCONN=9600 HA_MAXPIPES=256
HA_IDLE=$((IDLE < HA_MAXCONN - 100 ? IDLE : HA_MAXCONN - 100))

# shellcheck disable=SC2046
render scripts/bench/rules.csv.in $(listen_vars ours) >"$WORK/rules.csv"
# shellcheck disable=SC2046
render scripts/bench/haproxy.cfg.in $(listen_vars haproxy) "MAXCONN=$HA_MAXCONN" "MAXPIPES=$HA_MAXPIPES" >"$WORK/haproxy.cfg"
# shellcheck disable=SC2046
render scripts/bench/nginx.conf.in $(listen_vars nginx) >"$WORK/nginx/nginx.conf"

say "backends on 127.0.0.1:$IPERF (iperf3), :$ECHO (echo), :$SOCKPERF (sockperf); work dir $WORK"
start_bg "$WORK/iperf3.log" iperf3 -s -B 127.0.0.1 -p "$IPERF" --idle-timeout 120
start_bg "$WORK/echo.log" "$LOAD" echo --listen "127.0.0.1:$ECHO" --threads 2 --max-seconds 1800
start_bg "$WORK/sockperf.log" sockperf sr --tcp -i 127.0.0.1 -p "$SOCKPERF"
for p in "$IPERF" "$ECHO" "$SOCKPERF"; do wait_port "$p"; done

start_bg "$WORK/forwarder.log" "$FORWARDER" --rules "$WORK/rules.csv" --no-web --workers 2 \
    --log-level warn --drain-timeout-s 1
PID[ours]=$BG_PID
start_bg "$WORK/haproxy.log" haproxy -f "$WORK/haproxy.cfg" -db
PID[haproxy]=$BG_PID
start_bg "$WORK/nginx.log" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx-error.log"
PID[nginx]=$BG_PID
for t in ours haproxy nginx; do
    for s in iperf echo sockperf; do wait_port "$(port_of $t $s)"; done
done
CAPACITY=$(grep -o 'capacity ≈.*' "$WORK/forwarder.log" | head -1 || true)

cpu_of() { # pid -> CPU ns of its process tree, or null
    if [ -z "$1" ]; then echo null; else "$LOAD" proc --pid "$1" | jq .cpu_ns; fi
}
tree_of() { [ -z "$1" ] && return; "$LOAD" proc --pid "$1" | jq -c .pids; }
declare -A TREE
for t in ours haproxy nginx; do TREE[$t]=$(tree_of "${PID[$t]}"); done

# ---- loads ---------------------------------------------------------------------------------------
# Each writes one JSON object to $WORK/res/<load>-<target>-<round>.json.

run_bulk() { # target streams out
    local t=$1 n=$2 out=$3 raw before after
    raw=$WORK/raw/$(basename "$3")
    before=$(cpu_of "${PID[$t]}")
    timeout $((SECS + 30)) iperf3 -c 127.0.0.1 -p "$(port_of "$t" iperf)" -t "$SECS" -P "$n" -J \
        --connect-timeout 3000 >"$raw" 2>&1 || true
    after=$(cpu_of "${PID[$t]}")
    jq -c --argjson before "$before" --argjson after "$after" '
        (.end.sum_received.bytes // null) as $rx
        | { gbps: (if $rx then .end.sum_received.bits_per_second / 1e9 else null end),
            sent: (.end.sum_sent.bytes // null), received: $rx, error: (.error // null),
            cpu_us_per_mb: (if $before != null and $rx then ($after - $before) / 1000 / ($rx / 1e6) else null end),
            endpoints_cpu_us_per_mb: (if $rx then (.end.cpu_utilization_percent.host_total
                + .end.cpu_utilization_percent.remote_total) / 100 * .end.sum_received.seconds * 1e6 / ($rx / 1e6)
                else null end) }' \
        "$raw" >"$out" 2>/dev/null || echo '{"error":"iperf3 gave no JSON"}' >"$out"
}

# All targets in one run, alternating in 50 ms slices so they see the same background noise.
run_ping_all() { # round
    local args=() t i=0 lines
    for t in "${TARGETS[@]}"; do
        args+=(--target "127.0.0.1:$(port_of "$t" echo)" --proxy-pid "${PID[$t]:-0}")
    done
    lines=$WORK/raw/ping-$1.jsonl
    if ! "$LOAD" pingpong "${args[@]}" --seconds "$SECS" --slice-ms 50 >"$lines" 2>"$lines.err"; then
        for t in "${TARGETS[@]}"; do echo "{\"error\":$(jq -Rs . <"$lines.err")}" >"$WORK/res/ping-$t-$1.json"; done
        return
    fi
    for t in "${TARGETS[@]}"; do
        i=$((i + 1))
        sed -n "${i}p" "$lines" >"$WORK/res/ping-$t-$1.json"
    done
}

run_sockperf() { # target out
    local raw
    raw=$WORK/raw/$(basename "$2")
    timeout $((SECS + 20)) sockperf pp --tcp -i 127.0.0.1 -p "$(port_of "$1" sockperf)" -t "$SECS" -m 64 \
        >"$raw" 2>&1 || true
    awk '/percentile 50.000 =/ { p50 = $NF } /percentile 99.000 =/ { p99 = $NF }
         END { if (p50 == "") print "{\"error\":\"sockperf gave no percentiles\"}";
               else printf "{\"p50_us\":%s,\"p99_us\":%s}\n", p50, p99 }' "$raw" >"$2"
}

run_conn() { # target out
    local pid=${PID[$1]}
    "$LOAD" connrate --target "127.0.0.1:$(port_of "$1" echo)" --seconds "$SECS" --concurrency 32 \
        ${pid:+--proxy-pid "$pid"} >"$2" 2>"$2.err" || echo "{\"error\":$(jq -Rs . <"$2.err")}" >"$2"
}

run_rr() { # target out
    local pid=${PID[$1]}
    "$LOAD" rr --target "127.0.0.1:$(port_of "$1" echo)" --seconds "$SECS" --connections "$RR_CONNS" \
        ${pid:+--proxy-pid "$pid"} >"$2" 2>"$2.err" || echo "{\"error\":$(jq -Rs . <"$2.err")}" >"$2"
}

run_idle() { # target count out
    "$LOAD" idle --target "127.0.0.1:$(port_of "$1" echo)" --connections "$2" --proxy-pid "${PID[$1]}" \
        >"$3" 2>"$3.err" || echo "{\"error\":$(jq -Rs . <"$3.err")}" >"$3"
}

START=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$(date +%s)

# Idle connections first, while every proxy is fresh (memory freed by earlier loads would hide the
# cost of new connections).
for t in ours haproxy nginx; do
    n=$IDLE
    [ "$t" = haproxy ] && n=$HA_IDLE
    say "idle: $n connections through ${LABEL[$t]}"
    run_idle "$t" "$n" "$WORK/res/idle-$t-1.json"
    wait_quiet "$ECHO"
done

LOADS=(bulk1 bulk8 ping sockperf conn rr)
for r in $(seq "$ROUNDS"); do
    for load in "${LOADS[@]}"; do
        if [ "$load" = ping ]; then
            say "round $r/$ROUNDS: ping-pong, all targets in alternating 50 ms slices"
            run_ping_all "$r"
            for t in "${TARGETS[@]}"; do
                if jq -e '.error // .warning' "$WORK/res/ping-$t-$r.json" >/dev/null 2>&1; then
                    say "  problem: ${LABEL[$t]} $(jq -c '{error, warning}' "$WORK/res/ping-$t-$r.json")"
                fi
            done
            continue
        fi
        # Rotate the order each round so no target always runs right after another's load.
        for i in 0 1 2 3; do
            t=${TARGETS[$(((i + r - 1) % 4))]}
            out=$WORK/res/$load-$t-$r.json
            say "round $r/$ROUNDS: $load via ${LABEL[$t]}"
            case $load in
            bulk1) run_bulk "$t" 1 "$out" ;;
            bulk8) run_bulk "$t" 8 "$out" ;;
            sockperf) run_sockperf "$t" "$out" ;;
            conn) run_conn "$t" "$out" ;;
            rr) run_rr "$t" "$out" ;;
            esac
            if jq -e '.error // .warning' "$out" >/dev/null 2>&1; then
                say "  problem: $(jq -c '{error, warning}' "$out")"
            fi
            wait_quiet "$ECHO" 10
        done
    done
done
ELAPSED=$(($(date +%s) - T0))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Every proxy must still run with the processes it started with (no crashed worker).
HEALTH=()
for t in ours haproxy nginx; do
    now=$(tree_of "${PID[$t]}")
    if ! kill -0 "${PID[$t]}" 2>/dev/null; then
        HEALTH+=("${LABEL[$t]} DIED during the run (log: $(tail -3 "$WORK/${t/ours/forwarder}.log" 2>/dev/null | tr '\n' ' '))")
    elif [ "$now" != "${TREE[$t]}" ]; then
        HEALTH+=("${LABEL[$t]}: processes changed during the run (${TREE[$t]} -> $now)")
    fi
done

# What the report needs besides the results, so `--from DIR` can print it again.
{
    printf 'START=%q\nELAPSED=%q\nROUNDS=%q\nSECS=%q\nRR_CONNS=%q\n' "$START" "$ELAPSED" "$ROUNDS" "$SECS" "$RR_CONNS"
    printf 'LOAD_BEFORE=%q\nLOAD_AFTER=%q\nCAPACITY=%q\n' "$LOAD_BEFORE" "$LOAD_AFTER" "$CAPACITY"
    printf 'HA_MAXCONN=%q\nHA_MAXPIPES=%q\nCORES=%q\nKERNEL=%q\n' "$HA_MAXCONN" "$HA_MAXPIPES" "$(nproc)" "$(uname -r)"
    printf 'VERSIONS=%q\n' "$(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3), nginx $(nginx -v 2>&1 | cut -d/ -f2), $(iperf3 --version 2>/dev/null | head -1 | cut -d' ' -f1-2), sockperf $(sockperf --version 2>/dev/null | head -1 | sed 's/.*version \([0-9.]*\).*/\1/')"
    commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
    [ -z "$(git -C "$ROOT" status --porcelain -- forwarder 2>/dev/null)" ] || commit="$commit + uncommitted forwarder changes"
    printf 'COMMIT=%q\n' "${BENCH_COMMIT:-$commit}"
    if [ ${#HEALTH[@]} -gt 0 ]; then printf 'HEALTH=(%s)\n' "$(printf '%q ' "${HEALTH[@]}")"; else echo 'HEALTH=()'; fi
} >"$WORK/meta.env"
report "$WORK" | tee "$WORK/table.md"
[ -z "$OUT" ] || cp "$WORK/table.md" "$OUT"
