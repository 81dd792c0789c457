#!/usr/bin/env bash
# Bulk streams (issue 30): direct loopback vs our forwarder with --data-path copy, splice and auto
# vs nginx stream (2 workers) vs HAProxy (2 threads, splice-auto), side by side in one run, on
# 127.0.0.1 only. Every round runs iperf3 with 1 stream and with 8 (-P 8) through every target,
# the order rotating each round; each figure is a ratio to direct *within its round*, so a loaded
# machine slows the denominator alike. CPU per GB is the proxy's whole process tree (bench-load
# proc: /proc/<pid>/task/*/schedstat) over the bytes iperf3 received. Prints which path auto chose
# and why (its start-up line), the machine's load (uptime) before and after.
#
# Usage: scripts/bench/bench-forwarder.sh --bulk, or scripts/bench/bulk.sh [--rounds N] [--seconds S] [--out FILE] [--keep] [--no-build]
# Run it under `flock /work/locks/bench.lock` on a shared machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=../lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=lib.sh
source scripts/bench/lib.sh

usage() {
    cat <<'EOF'
Usage: scripts/bench/bulk.sh [options]
  --rounds N     interleaved rounds (every target, 1 and 8 streams, each round) [5]
  --seconds S    length of each iperf3 run [3]
  --out FILE     also write the result (markdown) to FILE
  --keep         keep the work directory (logs, raw iperf3 JSON)
  --no-build     use the release binaries already built
EOF
}

ROUNDS=5 SECS=3 OUT="" KEEP=0 BUILD=1
# BUILD is read by release_binaries (lib.sh).
# shellcheck disable=SC2034
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --seconds) SECS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bulk: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
for v in ROUNDS SECS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -eq 0 ]; then
        echo "bulk: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
say() { echo "bulk: $*" >&2; }

ensure_apt_packages iperf3 haproxy nginx libnginx-mod-stream jq iproute2
release_binaries bulk

WORK=$(mktemp -d /tmp/bench-bulk.XXXXXX)
mkdir -p "$WORK/res" "$WORK/raw" "$WORK/nginx"
cleanup() {
    stop_all
    if [ "$KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BASE=$(pick_port_block)
IPERF=$BASE
TARGETS=(direct copy splice auto nginx haproxy)
declare -A OFFSET=([direct]=0 [copy]=5 [splice]=10 [auto]=15 [nginx]=20 [haproxy]=25)
declare -A LABEL=([direct]=direct [copy]="ours copy" [splice]="ours splice" [auto]="ours auto"
    [nginx]="nginx stream" [haproxy]="HAProxy (splice-auto)")
declare -A PID=([direct]="")
port_of() { echo $((IPERF + ${OFFSET[$1]})); }
# The templates' other services point at ports nothing listens on; only iperf is loaded here.
vars() { echo "LISTEN_IPERF=$(port_of "$1")" "LISTEN_ECHO=$(($(port_of "$1") + 1))" \
    "LISTEN_SOCKPERF=$(($(port_of "$1") + 2))" "IPERF=$IPERF" "ECHO=$((BASE + 48))" \
    "SOCKPERF=$((BASE + 49))" "WORK=$WORK"; }

LOAD_BEFORE=$(uptime)
start_bg "$WORK/iperf3.log" iperf3 -s -B 127.0.0.1 -p "$IPERF" --idle-timeout 300
wait_listen "$IPERF"
for p in copy splice auto; do
    # shellcheck disable=SC2046
    render scripts/bench/rules.csv.in $(vars "$p") >"$WORK/rules-$p.csv"
    start_bg "$WORK/forwarder-$p.log" "$FORWARDER" --rules "$WORK/rules-$p.csv" --no-web \
        --workers 2 --log-level warn --drain-timeout-s 1 --data-path "$p"
    PID[$p]=$BG_PID
done
# shellcheck disable=SC2046
render scripts/bench/haproxy.cfg.in $(vars haproxy) MAXCONN=1000 MAXPIPES=256 >"$WORK/haproxy.cfg"
# shellcheck disable=SC2046
render scripts/bench/nginx.conf.in $(vars nginx) >"$WORK/nginx/nginx.conf"
start_bg "$WORK/haproxy.log" haproxy -f "$WORK/haproxy.cfg" -db
PID[haproxy]=$BG_PID
start_bg "$WORK/nginx.log" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx-error.log"
PID[nginx]=$BG_PID
for t in copy splice auto nginx haproxy; do wait_listen "$(port_of $t)"; done
AUTO_LINE=$(grep -o 'data path: .*' "$WORK/forwarder-auto.log" | head -1 || true)
[ -n "$AUTO_LINE" ] || { say "the auto forwarder did not say its data path"; exit 1; }
say "$AUTO_LINE"

cpu_of() { if [ -z "$1" ]; then echo null; else "$LOAD" proc --pid "$1" | jq .cpu_ns; fi; }

run_bulk() { # target streams round
    local t=$1 n=$2 r=$3 raw before after
    raw=$WORK/raw/$t-$n-$r.json
    before=$(cpu_of "${PID[$t]}")
    timeout $((SECS + 30)) iperf3 -c 127.0.0.1 -p "$(port_of "$t")" -t "$SECS" -P "$n" -J \
        --connect-timeout 3000 >"$raw" 2>&1 || true
    after=$(cpu_of "${PID[$t]}")
    jq -c --argjson before "$before" --argjson after "$after" '
        (.end.sum_received.bytes // null) as $rx
        | { gbps: (if $rx then .end.sum_received.bits_per_second / 1e9 else null end),
            ms_per_gb: (if $before != null and $rx then ($after - $before) / 1e6 / ($rx / 1e9) else null end) }' \
        "$raw" >"$WORK/res/$t-$n-$r.json" 2>/dev/null || echo '{"gbps":null,"ms_per_gb":null}' >"$WORK/res/$t-$n-$r.json"
    wait_quiet "$(port_of "$t")" 10
}

for r in $(seq "$ROUNDS"); do
    # Rotate the order so no target always runs first (or right after direct).
    k=$(((r - 1) % ${#TARGETS[@]}))
    order=("${TARGETS[@]:k}" "${TARGETS[@]:0:k}")
    say "round $r/$ROUNDS: ${order[*]}"
    for n in 1 8; do
        for t in "${order[@]}"; do run_bulk "$t" "$n" "$r"; done
    done
done
LOAD_AFTER=$(uptime)

field() { jq -r ".$4 // \"null\"" "$WORK/res/$1-$2-$3.json"; }
# Per-round ratio to direct for target $1, streams $2: one a line.
ratios() {
    local r d v
    for r in $(seq "$ROUNDS"); do
        d=$(field direct "$2" "$r" gbps) v=$(field "$1" "$2" "$r" gbps)
        awk -v a="$v" -v b="$d" 'BEGIN { if (a == "null" || b == "null" || b == 0) print "null"; else printf "%.3f\n", a / b }'
    done
}
minmax() { { grep -v '^null$' || true; } | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) printf "%.2f–%.2f", lo, hi; else print "—" }'; }

table() {
    echo "Bulk through each target, $ROUNDS interleaved rounds of ${SECS} s iperf3 runs; ratios to direct within each round (median [min–max]); CPU per GB of the proxy's processes (median)."
    echo
    echo "| target | 1 stream × direct | CPU ms/GB (1) | 8 streams × direct | CPU ms/GB (8) |"
    echo "|---|---|---|---|---|"
    local t n cells
    for t in "${TARGETS[@]}"; do
        cells="| ${LABEL[$t]} |"
        for n in 1 8; do
            if [ "$t" = direct ]; then
                cells+=" $(fmt "$(for r in $(seq "$ROUNDS"); do field direct "$n" "$r" gbps; done | median)" 1) Gbit/s |"
            else
                cells+=" $(fmt "$(ratios "$t" "$n" | median)" 2)× [$(ratios "$t" "$n" | minmax)] |"
            fi
            cells+=" $(fmt "$(for r in $(seq "$ROUNDS"); do field "$t" "$n" "$r" ms_per_gb; done | median)" 0) |"
        done
        echo "$cells"
    done
    echo
    echo "auto: $AUTO_LINE"
    echo
    echo "Rounds in which ours (auto) beat both peers on one stream: $(
        w=0
        for r in $(seq "$ROUNDS"); do
            a=$(field auto 1 "$r" gbps) g=$(field nginx 1 "$r" gbps) h=$(field haproxy 1 "$r" gbps)
            if less_than "$g" "$a" && less_than "$h" "$a"; then w=$((w + 1)); fi
        done
        echo "$w of $ROUNDS")"
    echo
    echo "Load before: $LOAD_BEFORE"
    echo "Load after:  $LOAD_AFTER"
}
table | tee "${OUT:-/dev/null}"
