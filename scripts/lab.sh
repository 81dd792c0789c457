#!/usr/bin/env bash
# The original six-PC lab on one machine: network namespaces for the gateway (forwarder), two
# clients and three servers, and the five test cases run against the real programs.
#
#   scripts/lab.sh up            build the topology and start the services (stays up)
#   scripts/lab.sh run [CASE...] fresh lab, run the cases (default 1-5), print and save the table,
#                                then tear everything down (also on failure or Ctrl-C)
#   scripts/lab.sh report        print the table of the last run
#   scripts/lab.sh down          remove everything the lab created (safe to run any time)
#
# Environment: LAB_BIN_DIR (programs), LAB_CONNECTIONS (case 5, default 20000), LAB_RESULTS
# (default lab-results/), LAB_KEEP=1 (leave the lab up after run), LAB_REQUIRE_ALL=1 (a skipped
# case fails the run). Needs root. See docs/lab.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Every program the lab starts inherits the raised open-file limit (lab_spawn raises it again).
ulimit -n "$(ulimit -Hn)"
# shellcheck source=scripts/lab/common.sh
source "$REPO/scripts/lab/common.sh"
# shellcheck source=scripts/lab/net.sh
source "$REPO/scripts/lab/net.sh"
# shellcheck source=scripts/lab/services.sh
source "$REPO/scripts/lab/services.sh"
# shellcheck source=scripts/lab/cases.sh
source "$REPO/scripts/lab/cases.sh"
# shellcheck source=scripts/lib/apt.sh
source "$REPO/scripts/lib/apt.sh"

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Only one lab at a time: the namespace names and $LAB_DIR are fixed.
take_lock() {
    exec 9>"$LAB_LOCK"
    flock -n 9 || die "another lab is running (lock $LAB_LOCK); wait for it or run: $0 down"
}

lab_down() {
    services_down
    net_down
    if [ -e "$LAB_DIR/created-run-sshd" ]; then rmdir /run/sshd 2>/dev/null || true; fi
    rm -rf "$LAB_DIR"
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "the lab needs root (network namespaces); run: sudo $0 $cmd"
}

lab_up() {
    ensure_apt_packages apache2 openssh-server tshark curl python3 iproute2
    pick_bin_dir
    log "programs from $BIN_DIR ($BIN_DIR_WHY)"
    lab_down
    mkdir -p "$LAB_DIR/pids" "$LAB_DIR/logs"
    chmod 755 "$LAB_DIR"
    net_up
    services_up
}

lab_run() {
    local cases=("$@")
    [ ${#cases[@]} -gt 0 ] || cases=(1 2 3 4 5)
    local c
    for c in "${cases[@]}"; do
        [[ "$c" =~ ^[1-5]$ ]] || die "unknown case \"$c\" (cases are 1 to 5)"
    done
    local conns=${LAB_CONNECTIONS:-20000}
    if ! [[ "$conns" =~ ^[0-9]+$ ]] || [ "$conns" -lt 2 ] || [ $((conns % 2)) -ne 0 ]; then
        die "LAB_CONNECTIONS=\"$conns\" must be an even number of at least 2 (case 5 splits it over two servers)"
    fi
    if [ "${LAB_KEEP:-0}" != 1 ]; then
        # shellcheck disable=SC2154  # status is assigned inside the trap
        trap 'status=$?; trap - EXIT INT TERM; log "cleaning up"; lab_down; exit $status' EXIT
        trap 'exit 130' INT TERM
    fi
    lab_up
    mkdir -p "$LAB_RESULTS"
    rm -rf "$LAB_RESULTS"/case[1-5] "$LAB_RESULTS"/logs "$LAB_RESULTS"/results.tsv "$LAB_RESULTS"/summary.* "$LAB_RESULTS"/results.json
    : >"$LAB_RESULTS/results.tsv"
    local started load
    started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    # Figures depend on what else the machine runs; the header records it.
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    for c in "${cases[@]}"; do
        log "case $c: ${CASE_TITLES[$c]}"
        "case_$c" || record "$c" "-" "the case script itself failed (exit $?)" FAIL "-"
    done
    mkdir -p "$LAB_RESULTS/logs"
    cp "$LAB_DIR"/logs/* "$LAB_DIR/rules.csv" "$LAB_RESULTS/logs/" 2>/dev/null || true
    echo >&2
    "$PYTHON" "$REPO/scripts/lab/table.py" "$LAB_RESULTS" \
        "Lab run $started, cases ${cases[*]}, programs from $BIN_DIR, case 5 with ${LAB_CONNECTIONS:-20000} connections; $(nproc) cores, load average $load at start"
    log "results in $LAB_RESULTS"
    local fails skips
    fails=$(cut -f5 "$LAB_RESULTS/results.tsv" | grep -c '^FAIL' || true)
    skips=$(cut -f5 "$LAB_RESULTS/results.tsv" | grep -c '^SKIP' || true)
    if [ "$fails" -gt 0 ]; then
        log "$fails case(s) failed"
        return 1
    fi
    if [ "$skips" -gt 0 ] && [ "${LAB_REQUIRE_ALL:-0}" = 1 ]; then
        log "$skips case(s) skipped and LAB_REQUIRE_ALL=1"
        return 1
    fi
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case "$cmd" in
up)
    need_root
    take_lock
    lab_up
    log "lab is up; state in $LAB_DIR; stop it with: $0 down"
    ;;
down)
    need_root
    lab_down
    log "lab is down"
    ;;
run)
    need_root
    take_lock
    lab_run "$@"
    ;;
report)
    [ -s "$LAB_RESULTS/summary.txt" ] || die "no results yet in $LAB_RESULTS; run: $0 run"
    cat "$LAB_RESULTS/summary.txt"
    ;;
*) usage ;;
esac
