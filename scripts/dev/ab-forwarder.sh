#!/usr/bin/env bash
# Two forwarder builds side by side: both run at once (2 workers, no web page) in front of one echo
# server, and the loads alternate between them, A B A B ..., so the noise of a shared machine falls
# on both alike. Prints each load's proxy CPU per unit of work (median over the rounds) and B/A.
# Whichever build is B measured 3-5 % dearer in both orders (docs/benchmarks.md): run it both ways
# round and take the geometric mean of the two ratios.
#
# Usage: scripts/dev/ab-forwarder.sh A_TARGET_DIR B_TARGET_DIR [ROUNDS] [SECONDS]
#   each TARGET_DIR holds release/forwarder and release/examples/bench-load (cargo build --release
#   -p forwarder --bins --examples with CARGO_TARGET_DIR set to it).
#   AB_OPTIONS_A / AB_OPTIONS_B, when set, are the options column of that side's rule (e.g. a
#   1,000-CIDR allow list: the same build on both sides then measures what the option costs).
set -euo pipefail

A=${1:?usage: ab-forwarder.sh A_TARGET_DIR B_TARGET_DIR [ROUNDS] [SECONDS]}
B=${2:?usage: ab-forwarder.sh A_TARGET_DIR B_TARGET_DIR [ROUNDS] [SECONDS]}
ROUNDS=${3:-6}
SECS=${4:-3}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=../bench/lib.sh
source "$ROOT/scripts/bench/lib.sh"
command -v jq >/dev/null || { echo "ab-forwarder: needs jq (apt-get install jq)" >&2; exit 1; }
LOAD=$A/release/examples/bench-load
for f in "$A/release/forwarder" "$B/release/forwarder" "$LOAD"; do
    [ -x "$f" ] || { echo "ab-forwarder: $f is missing" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/ab-forwarder.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
BASE=$(pick_port_block)
ECHO=$BASE
declare -A PORT=([a]=$((BASE + 1)) [b]=$((BASE + 2)))
declare -A BIN=([a]=$A/release/forwarder [b]=$B/release/forwarder)
declare -A PID

start_bg "$WORK/echo.log" "$LOAD" echo --listen "127.0.0.1:$ECHO" --threads 2 --max-seconds 1800
wait_port "$ECHO"
for v in a b; do
    opts_var=AB_OPTIONS_${v^^}
    if [ -n "${!opts_var:-}" ]; then
        echo "ab,${PORT[$v]},127.0.0.1,$ECHO,\"${!opts_var}\"" >"$WORK/rules-$v.csv"
    else
        echo "ab,${PORT[$v]},127.0.0.1,$ECHO" >"$WORK/rules-$v.csv"
    fi
    start_bg "$WORK/forwarder-$v.log" "${BIN[$v]}" --rules "$WORK/rules-$v.csv" --no-web --workers 2
    PID[$v]=$BG_PID
    wait_port "${PORT[$v]}"
done

for round in $(seq "$ROUNDS"); do
    for v in a b; do
        "$LOAD" connrate --target "127.0.0.1:${PORT[$v]}" --seconds "$SECS" --concurrency 32 \
            --proxy-pid "${PID[$v]}" >"$WORK/conn-$v-$round.json"
        "$LOAD" rr --target "127.0.0.1:${PORT[$v]}" --seconds "$SECS" --connections 1000 \
            --proxy-pid "${PID[$v]}" >"$WORK/rr-$v-$round.json"
    done
done

median() { jq -s 'map(select(. != null)) | sort | if length == 0 then null else .[length / 2 | floor] * 10 | round / 10 end'; }
printf '| load (%s rounds of %s s, alternating) | A | B | B/A |\n|---|---:|---:|---:|\n' "$ROUNDS" "$SECS"
# A missing figure prints "missing", never a number.
declare -A FIELDS=([conn]="proxy_cpu_ns_per_connection per_second" [rr]="proxy_cpu_ns_per_message per_second")
for load in conn rr; do
    for field in ${FIELDS[$load]}; do
        a=$(cat "$WORK"/$load-a-*.json | jq ".$field" | median)
        b=$(cat "$WORK"/$load-b-*.json | jq ".$field" | median)
        ratio=$(jq -n --argjson a "$a" --argjson b "$b" 'if $a == null or $b == null or $a == 0 then "missing" else ($b / $a * 100 | round / 100 | tostring) + "×" end' -r)
        printf '| %s %s | %s | %s | %s |\n' "$load" "$field" "$a" "$b" "$ratio"
    done
done
