#!/usr/bin/env bash
# The data-path comparison (issue 19): direct loopback vs the forwarder with `--data-path splice`
# vs with `--data-path sockmap`, side by side in one run, on 127.0.0.1 only.
#
# Loads, each bounded in count and time: --runs single-stream iperf3 runs per target, the targets
# alternating in a rotating order (the distribution is reported: min/p25/median/p75/max, and the
# ratio to direct); 64-byte ping-pong with all targets in alternating 50 ms slices (bench-load);
# closed-loop 64-byte request/response over --rr-connections connections; new connections per
# second (connect, 64-byte request, echo, close; joining the maps costs system calls). CPU is the whole
# machine's (/proc/stat), since with sockmap the work happens in softirq and kernel workers that
# no process of ours is charged for; the proxy's added cost is the figure minus direct's.
# For each bulk run the softirq time of every CPU is kept, to see where redirected bytes are
# processed (--keep keeps the raw figures).
#
# Run through scripts/bench/bench-forwarder.sh --data-path-compare [options].
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=../lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=lib.sh
source scripts/bench/lib.sh

usage() {
    cat <<'EOF'
Usage: scripts/bench/bench-forwarder.sh --data-path-compare [options]
  --runs N             single-stream iperf3 runs per target, alternating [20]
  --seconds S          length of each iperf3 run [3]
  --ping-seconds S     length of the ping-pong load (all targets in 50 ms slices) [6]
  --rr-rounds N        request/response runs per target, alternating [3]
  --rr-connections N   connections of the request/response load [1000]
  --pin-client CPU     run the iperf3 client on this CPU only (taskset), to test placement
  --out FILE           also write the result (markdown) to FILE
  --keep               keep the work directory (logs, raw results)
  --no-build           use the release binaries already built
EOF
}

RUNS=20 SECS=3 PING_SECS=6 RR_ROUNDS=3 RR_CONNS=1000 PIN="" OUT="" KEEP=0 BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=$2; shift ;;
    --seconds) SECS=$2; shift ;;
    --ping-seconds) PING_SECS=$2; shift ;;
    --rr-rounds) RR_ROUNDS=$2; shift ;;
    --rr-connections) RR_CONNS=$2; shift ;;
    --pin-client) PIN=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "data-path: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
for v in RUNS SECS PING_SECS RR_ROUNDS RR_CONNS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -eq 0 ]; then
        echo "data-path: $v must be a positive integer, got '${!v}'" >&2
        exit 2
    fi
done
if [ "$RUNS" -gt 200 ] || [ "$SECS" -gt 60 ]; then echo "data-path: at most 200 runs of 60 s" >&2; exit 2; fi
[ -z "$PIN" ] || [[ $PIN =~ ^[0-9]+$ ]] || { echo "data-path: --pin-client takes a CPU number" >&2; exit 2; }

say() { echo "data-path: $*" >&2; }

ensure_apt_packages iperf3 jq iproute2
release_binaries data-path

WORK=$(mktemp -d /tmp/bench-data-path.XXXXXX)
mkdir -p "$WORK/raw"
cleanup() {
    stop_all
    if [ "$KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BASE=$(pick_port_block)
IPERF=$BASE ECHO=$((BASE + 1))
TARGETS=(direct splice sockmap)
declare -A OFFSET=([direct]=0 [splice]=10 [sockmap]=20)
declare -A PID=([direct]=0)
port_of() { # target service
    case $2 in iperf) echo $((IPERF + ${OFFSET[$1]})) ;; echo) echo $((ECHO + ${OFFSET[$1]})) ;; esac
}

say "backends on 127.0.0.1:$IPERF (iperf3) and :$ECHO (echo); work dir $WORK"
start_bg "$WORK/iperf3.log" iperf3 -s -B 127.0.0.1 -p "$IPERF" --idle-timeout 300
start_bg "$WORK/echo.log" "$LOAD" echo --listen "127.0.0.1:$ECHO" --threads 2 --max-seconds 1800
for p in "$IPERF" "$ECHO"; do wait_port "$p"; done
for t in splice sockmap; do
    printf 'iperf,%s,127.0.0.1,%s\necho,%s,127.0.0.1,%s\n' "$(port_of $t iperf)" "$IPERF" \
        "$(port_of $t echo)" "$ECHO" >"$WORK/rules-$t.csv"
    start_bg "$WORK/forwarder-$t.log" "$FORWARDER" --rules "$WORK/rules-$t.csv" --no-web --workers 2 \
        --data-path "$t" --log-level info --drain-timeout-s 1
    PID[$t]=$BG_PID
    for s in iperf echo; do wait_port "$(port_of $t $s)"; done
done
grep -q "data path: sockmap" "$WORK/forwarder-sockmap.log" || {
    say "the sockmap forwarder did not load its program:"
    cat "$WORK/forwarder-sockmap.log" >&2
    exit 1
}

# Whole-machine busy time in ms (user, nice, system, irq, softirq, steal; USER_HZ = 100), then
# per CPU the softirq ms, then per CPU the busy ms: "total si0 si1 ... busy0 busy1 ...".
machine_ms() {
    awk '/^cpu / { total = ($2 + $3 + $4 + $7 + $8 + $9) * 10 }
         /^cpu[0-9]/ { si = si " " $8 * 10; busy = busy " " ($2 + $3 + $4 + $7 + $8 + $9) * 10 }
         END { print total si busy }' /proc/stat
}
minus() { # "a b c" "x y z" -> "a-x b-y c-z"
    paste -d' ' <(tr ' ' '\n' <<<"$1") <(tr ' ' '\n' <<<"$2") | awk '{ printf "%s%d", (NR > 1 ? " " : ""), $1 - $2 } END { print "" }'
}

# ---- single-stream bulk, alternating ---------------------------------------------------------
# One line per run in bulk.tsv: target run gbit/s machine-ms-per-GB softirq-ms-per-cpu...
PINCMD=()
[ -z "$PIN" ] || PINCMD=(taskset -c "$PIN")
T0=$(date +%s)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$WORK/bulk.tsv"
for r in $(seq "$RUNS"); do
    for i in 0 1 2; do
        t=${TARGETS[$(((i + r - 1) % 3))]}
        raw=$WORK/raw/bulk-$t-$r.json
        before=$(machine_ms)
        timeout $((SECS + 30)) "${PINCMD[@]}" iperf3 -c 127.0.0.1 -p "$(port_of "$t" iperf)" -t "$SECS" \
            -J --connect-timeout 3000 >"$raw" 2>&1 || true
        used=$(minus "$(machine_ms)" "$before")
        rx=$(jq -r '.end.sum_received.bytes // "null"' "$raw" 2>/dev/null || echo null)
        gbps=$(jq -r '(.end.sum_received.bits_per_second // 0) / 1e9' "$raw" 2>/dev/null || echo null)
        if [ "$rx" = null ] || [ "$rx" = 0 ]; then
            say "run $r via $t: no result ($(jq -r '.error // "no JSON"' "$raw" 2>/dev/null || echo 'no JSON'))"
            continue
        fi
        # shellcheck disable=SC2086
        set -- $used
        per_gb=$(awk -v ms="$1" -v rx="$rx" 'BEGIN { printf "%.0f", ms / (rx / 1e9) }')
        shift
        printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$gbps" "$per_gb" "$*" >>"$WORK/bulk.tsv"
        say "run $r/$RUNS via $t: $(fmt "$gbps" 2) Gbit/s, $per_gb ms CPU per GB, softirq then busy ms per CPU: $*"
    done
done

# ---- ping-pong, all targets in 50 ms slices ----------------------------------------------------
say "ping-pong: all targets in alternating 50 ms slices for $PING_SECS s"
args=()
for t in "${TARGETS[@]}"; do args+=(--target "127.0.0.1:$(port_of "$t" echo)" --proxy-pid "${PID[$t]}"); done
"${PINCMD[@]}" "$LOAD" pingpong "${args[@]}" --seconds "$PING_SECS" --slice-ms 50 \
    >"$WORK/ping.jsonl" 2>"$WORK/ping.err" || say "ping-pong failed: $(cat "$WORK/ping.err")"

# ---- request/response, whole-machine CPU per message ------------------------------------------
: >"$WORK/rr.tsv"
for r in $(seq "$RR_ROUNDS"); do
    for i in 0 1 2; do
        t=${TARGETS[$(((i + r - 1) % 3))]}
        out=$WORK/raw/rr-$t-$r.json
        before=$(machine_ms)
        "$LOAD" rr --target "127.0.0.1:$(port_of "$t" echo)" --seconds "$SECS" --connections "$RR_CONNS" \
            >"$out" 2>"$out.err" || { say "rr via $t failed: $(cat "$out.err")"; continue; }
        used=$(minus "$(machine_ms)" "$before")
        msgs=$(jq -r .messages "$out")
        rate=$(jq -r .per_second "$out")
        us=$(awk -v ms="${used%% *}" -v n="$msgs" 'BEGIN { printf "%.2f", ms * 1000 / n }')
        printf '%s\t%s\t%s\t%s\n' "$t" "$r" "$rate" "$us" >>"$WORK/rr.tsv"
        say "rr $r/$RR_ROUNDS via $t: $(fmt "$rate" 0) messages/s, $us µs machine CPU per message"
        wait_quiet "$ECHO" 10
    done
done
# ---- new connections per second, whole-machine CPU per connection ------------------------------
: >"$WORK/conn.tsv"
for r in $(seq "$RR_ROUNDS"); do
    for i in 0 1 2; do
        t=${TARGETS[$(((i + r - 1) % 3))]}
        out=$WORK/raw/conn-$t-$r.json
        before=$(machine_ms)
        "$LOAD" connrate --target "127.0.0.1:$(port_of "$t" echo)" --seconds "$SECS" --concurrency 32 \
            >"$out" 2>"$out.err" || { say "connrate via $t failed: $(cat "$out.err")"; continue; }
        used=$(minus "$(machine_ms)" "$before")
        n=$(jq -r .connections "$out")
        rate=$(jq -r .per_second "$out")
        us=$(awk -v ms="${used%% *}" -v n="$n" 'BEGIN { printf "%.1f", ms * 1000 / n }')
        printf '%s\t%s\t%s\t%s\n' "$t" "$r" "$rate" "$us" >>"$WORK/conn.tsv"
        say "connrate $r/$RR_ROUNDS via $t: $(fmt "$rate" 0) connections/s ($(jq -r .errors "$out") errors), $us µs machine CPU per connection"
        wait_quiet "$ECHO" 10
    done
done
ELAPSED=$(($(date +%s) - T0))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
for t in splice sockmap; do
    kill -0 "${PID[$t]}" 2>/dev/null || say "the $t forwarder DIED during the run"
done

# ---- report ---------------------------------------------------------------------------------
# Distribution of column $2 of target $1's lines in $3: "min p25 median p75 max n".
dist() {
    awk -F'\t' -v t="$1" -v c="$2" '$1 == t { print $c }' "$3" | sort -g | awk '
        { v[NR] = $1 }
        function q(p,   i) { i = int(p * (NR - 1)) + 1; f = p * (NR - 1) - (i - 1);
                             return (i < NR) ? v[i] + f * (v[i + 1] - v[i]) : v[i] }
        END { if (NR == 0) { print "null null null null null 0"; exit }
              printf "%.2f %.2f %.2f %.2f %.2f %d\n", v[1], q(0.25), q(0.5), q(0.75), v[NR], NR }'
}
{
    echo "### Data paths: direct vs splice vs sockmap ($START, $(nproc) cores, kernel $(uname -r))"
    echo
    echo "Commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); $ELAPSED s; load average before $LOAD_BEFORE, after $LOAD_AFTER.${PIN:+ iperf3 client pinned to CPU $PIN.}"
    echo
    echo "Single stream (iperf3, $SECS s a run, targets alternating), Gbit/s:"
    echo
    echo "| target | runs | min | p25 | median | p75 | max | median vs direct | machine CPU ms/GB (median) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    read -r _ _ dmed _ _ _ < <(dist direct 3 "$WORK/bulk.tsv")
    for t in "${TARGETS[@]}"; do
        read -r mn p25 med p75 mx n < <(dist "$t" 3 "$WORK/bulk.tsv")
        read -r _ _ cpu _ _ _ < <(dist "$t" 4 "$WORK/bulk.tsv")
        echo "| $t | $n | $mn | $p25 | $med | $p75 | $mx | $(ratio "$med" "$dmed") | $(fmt "$cpu" 0) |"
    done
    echo
    echo "Each run's ratio to the direct run of the same round (min / median / max):"
    echo
    for t in splice sockmap; do
        awk -F'\t' -v t="$t" '$1 == "direct" { d[$2] = $3 } $1 == t { s[$2] = $3 }
            END { for (r in s) if (r in d && d[r] > 0) print s[r] / d[r] }' "$WORK/bulk.tsv" | sort -g |
            awk -v t="$t" '{ v[NR] = $1 } END { if (NR) printf "- %s: %.2f× / %.2f× / %.2f× (%d rounds)\n", t, v[1], v[int((NR + 1) / 2)], v[NR], NR }'
    done
    echo
    echo "64-byte ping-pong (one connection, targets in alternating 50 ms slices, $PING_SECS s):"
    echo
    echo "| target | p50 µs | p90 µs | p99 µs | p99.9 µs | messages |"
    echo "|---|---:|---:|---:|---:|---:|"
    i=0
    for t in "${TARGETS[@]}"; do
        i=$((i + 1))
        line=$(sed -n "${i}p" "$WORK/ping.jsonl" 2>/dev/null)
        if [ -n "$line" ]; then
            echo "| $t | $(jq -r '[.p50_us, .p90_us, .p99_us, .p999_us, .messages]
                | map(if . == null then "—" else (. * 10 | round / 10 | tostring) end) | join(" | ")' <<<"$line") |"
        else
            echo "| $t | — | — | — | — | — |"
        fi
    done
    echo
    echo "64-byte request/response over $RR_CONNS connections ($RR_ROUNDS runs a target, medians):"
    echo
    echo "| target | messages/s | machine CPU µs/message | added over direct |"
    echo "|---|---:|---:|---:|"
    read -r _ _ drr _ _ _ < <(dist direct 4 "$WORK/rr.tsv")
    for t in "${TARGETS[@]}"; do
        read -r _ _ rate _ _ _ < <(dist "$t" 3 "$WORK/rr.tsv")
        read -r _ _ us _ _ _ < <(dist "$t" 4 "$WORK/rr.tsv")
        added=$(awk -v a="$us" -v b="$drr" 'BEGIN { if (a == "null" || b == "null") print "—"; else printf "%.2f", a - b }')
        echo "| $t | $(fmt "$rate" 0) | $us | $added |"
    done
    echo
    echo "New connections per second (32 in flight, 64 B request and echo each, $RR_ROUNDS runs a target, medians):"
    echo
    echo "| target | connections/s | machine CPU µs/connection | added over direct |"
    echo "|---|---:|---:|---:|"
    read -r _ _ dconn _ _ _ < <(dist direct 4 "$WORK/conn.tsv")
    for t in "${TARGETS[@]}"; do
        read -r _ _ rate _ _ _ < <(dist "$t" 3 "$WORK/conn.tsv")
        read -r _ _ us _ _ _ < <(dist "$t" 4 "$WORK/conn.tsv")
        added=$(awk -v a="$us" -v b="$dconn" 'BEGIN { if (a == "null" || b == "null") print "—"; else printf "%.1f", a - b }')
        echo "| $t | $(fmt "$rate" 0) | $us | $added |"
    done
    echo
    echo "Each bulk run: Gbit/s [softirq ms per CPU, then busy ms per CPU] (where the packets and redirects were processed):"
    echo
    for t in "${TARGETS[@]}"; do
        echo "- $t: $(awk -F'\t' -v t="$t" '$1 == t { printf "%s%s Gbit/s [%s]", (n++ ? "; " : ""), sprintf("%.1f", $3), $5 }' "$WORK/bulk.tsv")"
    done
} | tee "$WORK/table.md"
[ -z "$OUT" ] || cp "$WORK/table.md" "$OUT"
