#!/usr/bin/env bash
# UDP forwarder benchmark (run as `scripts/bench/bench-forwarder.sh --udp`): direct loopback vs our
# forwarder vs nginx stream (`listen … udp`, 2 workers) vs socat (UDP-LISTEN,fork) vs rinetd (a
# /udp rule), side by side in one run on 127.0.0.1 only.
#
# Loads (bounded in count and time; targets rotate order at every step): datagrams of 64 B and
# 1,400 B sent open-loop from 4 client sockets (4 sessions) at increasing rates to an echo backend
# through each proxy (bench-load udp-blast): datagrams/s received back and loss, and the proxy's
# CPU per forwarded datagram (all its processes, including socat's forked children); then ping-pong
# latency p50/p99 with sockperf (UDP, 64 B). The figure of merit per size: the highest rate at
# which loss stays below 0.1 %.
#
# Usage: scripts/bench/bench-forwarder.sh --udp [--quick] [--seconds S] [--rates "R1 R2 …"] [--out FILE]
#                                         [--keep] [--no-build] [--from DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=../lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=lib.sh
source scripts/bench/lib.sh

say() { echo "bench-udp: $*" >&2; }

# Prints the table of a run from its work directory (results and meta.env).
udp_report() {
    local dir=$1 t i size b w rate rate_txt cpu fixed loss row p50 p99
    # shellcheck disable=SC1091 # meta.env sets START … SHOWN_AS
    source "$dir/meta.env"
    # The CPU figure compared at one rate every target takes: 10,000/s when tried, else the lowest.
    local cpu_rate=10000
    [[ " $RATES " == *" 10000 "* ]] || cpu_rate=${RATES%% *}
    # Best step: the highest rate received back among steps with loss < 0.1 %.
    best() { cat "$dir"/res/blast-"$2"-*-"$1".json 2>/dev/null |
        jq -s 'map(select(.error == null and .loss_percent < 0.1)) | max_by(.received_per_s) // null'; }
    worst() { cat "$dir"/res/blast-"$2"-*-"$1".json 2>/dev/null |
        jq -s 'map(select(.error == null)) | max_by(.rate) // null'; }
    echo "UDP, $START, ${SECS} s per step, rates tried: $RATES datagrams/s (4 client sessions, echo backend)."
    echo "Load average before/after: $LOAD_BEFORE / $LOAD_AFTER; run took ${ELAPSED} s. forwarder at $COMMIT (2 workers); $VERSIONS."
    echo
    echo "| target | 64 B: datagrams/s at < 0.1 % loss | CPU µs/datagram there | at $cpu_rate/s | loss at highest rate tried | 1,400 B: datagrams/s at < 0.1 % loss | CPU µs/datagram there | at $cpu_rate/s | loss at highest rate tried | ping-pong p50 µs | p99 µs |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    for i in "${!TARGETS[@]}"; do
        t=${TARGETS[$i]}
        row="| ${SHOWN_AS[$i]}"
        for size in 64 1400; do
            b=$(best "$t" "$size")
            w=$(worst "$t" "$size")
            rate=$(jq -r 'if . == null then "none" else .received_per_s end' <<<"$b")
            cpu=$(jq -r 'if . == null or .cpu_ns_per_datagram == null then "null" else .cpu_ns_per_datagram / 1000 end' <<<"$b")
            fixed=$(jq -r 'if .error != null or .cpu_ns_per_datagram == null then "null" else .cpu_ns_per_datagram / 1000 end' \
                "$dir/res/blast-$size-$cpu_rate-$t.json" 2>/dev/null || echo null)
            loss=$(jq -r 'if . == null then "—" else "\(.loss_percent * 100 | round / 100) % at \(.rate)/s" end' <<<"$w")
            if [ "$rate" = none ]; then rate_txt="none"; else rate_txt=$(fmt "$rate" 0); fi
            row="$row | $rate_txt | $(fmt "$cpu" 2) | $(fmt "$fixed" 2) | $loss"
        done
        p50=$(jq -r '.p50_us // "null"' "$dir/res/ping-$t.json" 2>/dev/null || echo null)
        p99=$(jq -r '.p99_us // "null"' "$dir/res/ping-$t.json" 2>/dev/null || echo null)
        echo "$row | $(fmt "$p50" 1) | $(fmt "$p99" 1) |"
    done
}

QUICK=0 SECS="" RATES="" OUT="" KEEP=0 BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --seconds) SECS=$2; shift ;;
    --rates) RATES=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    --from) udp_report "$2"; exit 0 ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-udp: unknown option '$1'" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    SECS=${SECS:-1} RATES=${RATES:-"20000 80000 200000"}
else
    SECS=${SECS:-3} RATES=${RATES:-"5000 10000 20000 35000 50000 100000 200000"}
fi
ensure_apt_packages sockperf nginx libnginx-mod-stream socat rinetd jq iproute2
# BENCH_FORWARDER: another build of ours to measure; BENCH_FORWARDER_B: a second build measured
# side by side as one more target (say, before a change).
release_binaries bench-udp
FORWARDER_B=${BENCH_FORWARDER_B:-}

WORK=$(mktemp -d /tmp/bench-udp.XXXXXX)
mkdir -p "$WORK/res" "$WORK/raw" "$WORK/nginx"
cleanup() {
    stop_all
    if [ "$KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BASE=$(pick_port_block)
ECHO=$BASE SOCKPERF=$((BASE + 1))
TARGETS=(direct ours nginx socat rinetd)
declare -A OFFSET=([direct]=0 [ours]=10 [nginx]=20 [socat]=30 [rinetd]=40)
declare -A LABEL=([direct]=direct [ours]=forwarder [nginx]="nginx stream" [socat]=socat [rinetd]=rinetd)
declare -A PID=([direct]="")
if [ -n "$FORWARDER_B" ]; then
    TARGETS+=(ours_b)
    OFFSET[ours_b]=50
    LABEL[ours_b]="forwarder B ($(basename "$FORWARDER_B"))"
fi
N=${#TARGETS[@]}
port_of() { # target service
    case $2 in echo) echo $((ECHO + ${OFFSET[$1]})) ;; sockperf) echo $((SOCKPERF + ${OFFSET[$1]})) ;; esac
}
udp_bound() { [ -n "$(ss -Hlun "( sport = :$1 )")" ]; }
wait_udp() {
    local i
    for i in $(seq 100); do udp_bound "$1" && return 0; sleep 0.05; done
    echo "bench-udp: nothing bound udp 127.0.0.1:$1" >&2
    return 1
}

say "backends on 127.0.0.1:$ECHO (udp echo), :$SOCKPERF (sockperf); work dir $WORK"
start_bg "$WORK/echo.log" "$LOAD" udp-echo --listen "127.0.0.1:$ECHO" --threads 2 --max-seconds 1800
start_bg "$WORK/sockperf.log" sockperf sr -i 127.0.0.1 -p "$SOCKPERF"
wait_udp "$ECHO"
wait_udp "$SOCKPERF"

cat >"$WORK/rules.csv" <<EOF
udp-echo,127.0.0.1:$(port_of ours echo)/udp,127.0.0.1,$ECHO
udp-sockperf,127.0.0.1:$(port_of ours sockperf)/udp,127.0.0.1,$SOCKPERF
EOF
start_bg "$WORK/forwarder.log" "$FORWARDER" --rules "$WORK/rules.csv" --no-web --workers 2 \
    --log-level warn --drain-timeout-s 1
PID[ours]=$BG_PID
if [ -n "$FORWARDER_B" ]; then
    cat >"$WORK/rules-b.csv" <<EOF
udp-echo,127.0.0.1:$(port_of ours_b echo)/udp,127.0.0.1,$ECHO
udp-sockperf,127.0.0.1:$(port_of ours_b sockperf)/udp,127.0.0.1,$SOCKPERF
EOF
    start_bg "$WORK/forwarder-b.log" "$FORWARDER_B" --rules "$WORK/rules-b.csv" --no-web --workers 2 \
        --log-level warn --drain-timeout-s 1
    PID[ours_b]=$BG_PID
fi

cat >"$WORK/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 20000;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 19000; }
stream {
    proxy_timeout 60s;
    server { listen 127.0.0.1:$(port_of nginx echo) udp reuseport; proxy_pass 127.0.0.1:$ECHO; }
    server { listen 127.0.0.1:$(port_of nginx sockperf) udp reuseport; proxy_pass 127.0.0.1:$SOCKPERF; }
}
EOF
start_bg "$WORK/nginx.log" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx-error.log"
PID[nginx]=$BG_PID

# socat: one process per port, a forked child per client address (-T: a child ends after 60 s idle).
start_bg "$WORK/socat.log" bash -c "socat -T 60 UDP4-LISTEN:$(port_of socat echo),bind=127.0.0.1,fork,reuseaddr UDP4:127.0.0.1:$ECHO &
    socat -T 60 UDP4-LISTEN:$(port_of socat sockperf),bind=127.0.0.1,fork,reuseaddr UDP4:127.0.0.1:$SOCKPERF & wait"
PID[socat]=$BG_PID

cat >"$WORK/rinetd.conf" <<EOF
127.0.0.1 $(port_of rinetd echo)/udp 127.0.0.1 $ECHO/udp [timeout=60]
127.0.0.1 $(port_of rinetd sockperf)/udp 127.0.0.1 $SOCKPERF/udp [timeout=60]
EOF
start_bg "$WORK/rinetd.log" rinetd -f -c "$WORK/rinetd.conf"
PID[rinetd]=$BG_PID

for t in "${TARGETS[@]:1}"; do
    for s in echo sockperf; do wait_udp "$(port_of "$t" $s)"; done
done

START=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$(date +%s)

# ---- loads ---------------------------------------------------------------------------------------
run_blast() { # target size rate out
    local pid=${PID[$1]}
    timeout $((SECS + 30)) "$LOAD" udp-blast --target "127.0.0.1:$(port_of "$1" echo)" --size "$2" \
        --rate "$3" --seconds "$SECS" --sockets 4 ${pid:+--proxy-pid "$pid"} >"$4" 2>"$4.err" ||
        echo "{\"error\":$(jq -Rs . <"$4.err")}" >"$4"
}

run_ping() { # target out
    local raw
    raw=$WORK/raw/$(basename "$2")
    timeout $((SECS + 20)) sockperf pp -i 127.0.0.1 -p "$(port_of "$1" sockperf)" -t "$SECS" -m 64 \
        >"$raw" 2>&1 || true
    awk '/percentile 50.000 =/ { p50 = $NF } /percentile 99.000 =/ { p99 = $NF }
         END { if (p50 == "") print "{\"error\":\"sockperf gave no percentiles\"}";
               else printf "{\"p50_us\":%s,\"p99_us\":%s}\n", p50, p99 }' "$raw" >"$2"
}

declare -A GAVE_UP
step=0
for size in 64 1400; do
    for rate in $RATES; do
        step=$((step + 1))
        for ((i = 0; i < N; i++)); do
            t=${TARGETS[$(((i + step) % N))]}
            # A target that already lost over 5 % at a lower rate is not pushed harder.
            [ -n "${GAVE_UP[$t-$size]:-}" ] && continue
            out=$WORK/res/blast-$size-$rate-$t.json
            say "$size B at $rate/s via ${LABEL[$t]}"
            run_blast "$t" "$size" "$rate" "$out"
            if jq -e '.error' "$out" >/dev/null 2>&1; then
                say "  problem: $(jq -c .error "$out")"
                GAVE_UP[$t-$size]=1
            elif jq -e '.loss_percent > 5' "$out" >/dev/null; then
                GAVE_UP[$t-$size]=1
            fi
        done
    done
done
for t in "${TARGETS[@]}"; do
    say "ping-pong via ${LABEL[$t]}"
    run_ping "$t" "$WORK/res/ping-$t.json"
done
ELAPSED=$(($(date +%s) - T0))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report --------------------------------------------------------------------------------------
{
    printf 'START=%q\nELAPSED=%q\nSECS=%q\nRATES=%q\nLOAD_BEFORE=%q\nLOAD_AFTER=%q\n' \
        "$START" "$ELAPSED" "$SECS" "$RATES" "$LOAD_BEFORE" "$LOAD_AFTER"
    printf 'TARGETS=(%s)\n' "${TARGETS[*]}"
    printf 'SHOWN_AS=(%s)\n' "$(for t in "${TARGETS[@]}"; do printf '%q ' "${LABEL[$t]}"; done)"
    printf 'COMMIT=%q\nVERSIONS=%q\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "nginx $(nginx -v 2>&1 | cut -d/ -f2) (2 workers); $(socat -V 2>/dev/null | sed -n 's/^socat version \([^ ]*\).*/socat \1/p'); rinetd $(dpkg-query -W -f='${Version}' rinetd 2>/dev/null); sockperf $(sockperf --version 2>/dev/null | head -1 | sed 's/.*version \([0-9.]*\).*/\1/')"
} >"$WORK/meta.env"
udp_report "$WORK" | tee "$WORK/table.md"
[ -z "$OUT" ] || cp "$WORK/table.md" "$OUT"
