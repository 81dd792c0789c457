# shellcheck shell=bash
# Helpers for the benchmarks under scripts/bench/: free port blocks, quiet sockets, templates, and
# the figures' arithmetic, on top of scripts/lib/common.sh (waiting on ports, background processes,
# binaries). Sourced, not run.

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

# True when no socket in any state uses a port in [first, first+count).
ports_free() {
    local first=$1 count=$2
    [ -z "$(ss -Htan "( sport >= :$first and sport < :$((first + count)) )")" ]
}

# A free block of 50 ports below the ephemeral range, picked at random; echoes its first port.
pick_port_block() {
    local _ base
    for _ in $(seq 50); do
        base=$((21000 + (RANDOM % 200) * 50))
        if ports_free "$base" 50; then
            echo "$base"
            return 0
        fi
    done
    echo "no free block of 50 ports found in 21000-31000" >&2
    return 1
}

# Waits up to $2 seconds for established connections to port $1 to be gone (the previous load's
# connections closing), so loads do not overlap.
wait_quiet() {
    local port=$1 secs=${2:-20} i
    for i in $(seq $((secs * 10))); do
        [ "$(ss -Htn state established "( dport = :$port )" | wc -l)" -eq 0 ] && return 0
        sleep 0.1
    done
    echo "warning: connections to port $port still open after ${secs}s" >&2
}

# Fills @NAME@ placeholders of template $1 from the variables named in the rest ("NAME=value").
render() {
    local template=$1
    shift
    local expr=() kv
    for kv in "$@"; do
        expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${expr[@]}" "$template"
}

# Median of the numbers on stdin (one a line, "null" lines ignored); "null" when there are none.
median() {
    { grep -v '^null$' || true; } | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "null"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Formats a number with $2 decimals (default 1); "—" for null/empty.
fmt() {
    local v=$1 d=${2:-1}
    if [ -z "$v" ] || [ "$v" = null ]; then
        echo "—"
    else
        LC_ALL=C printf "%.${d}f" "$v"
    fi
}

# a/b with 2 decimals followed by ×; "—" when either is missing or b is 0.
ratio() {
    local a=$1 b=$2
    if [ -z "$a" ] || [ -z "$b" ] || [ "$a" = null ] || [ "$b" = null ]; then
        echo "—"
        return
    fi
    awk -v a="$a" -v b="$b" 'BEGIN { if (b == 0) print "—"; else printf "%.2f×\n", a / b }'
}

# True when a < b; false when either figure is missing.
less_than() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && b != "" && a != "null" && b != "null" && a + 0 < b + 0) }'; }
# True when a <= b; false when either figure is missing.
at_most() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && b != "" && a != "null" && b != "null" && a + 0 <= b + 0) }'; }
