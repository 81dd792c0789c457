# shellcheck shell=bash
# The shell every script shares: wait until a port listens, run in a network namespace, find the
# workspace's release binaries, and background process groups that are always cleaned up.
# Sourced, not run. Scripts that only need Debian packages source scripts/lib/apt.sh alone.

# Waits up to SECONDS (default 10) for a TCP listener on PORT, read from the socket table (`ss`),
# so no probe connection reaches the program; inside network namespace NS when given.
# Usage: wait_port PORT [SECONDS] [NS]. Returns 1 (after saying so on stderr) on time-out.
wait_port() {
    local port=$1 secs=${2:-10} ns=${3:-} i
    local ss_cmd=(ss -Htln "( sport = :$port )")
    [ -n "$ns" ] && ss_cmd=(ip netns exec "$ns" "${ss_cmd[@]}")
    for i in $(seq $((secs * 20))); do
        [ -n "$("${ss_cmd[@]}" 2>/dev/null)" ] && return 0
        sleep 0.05
    done
    echo "nothing listens on port $port${ns:+ in netns $ns} after ${secs}s" >&2
    return 1
}

# Runs "$@" (after NS) inside network namespace NS.
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# The folder with the workspace's release binaries: $CARGO_TARGET_DIR (or target/ under the
# repository) plus /release. Usage: release_dir ROOT.
release_dir() {
    echo "${CARGO_TARGET_DIR:-$1/target}/release"
}

# Builds the release forwarder and bench-load when BUILD=1 (the default), then checks they are
# there; sets TARGET_DIR, FORWARDER (BENCH_FORWARDER when set: another build to measure) and LOAD.
# Needs ROOT. Usage: release_binaries TOOL-NAME (named in the messages).
release_binaries() {
    TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
    if [ "${BUILD:-1}" = 1 ]; then
        echo "$1: building release binaries (cargo build --release -p forwarder --bins --examples)" >&2
        cargo build --release -q -p forwarder --bins --examples
    fi
    FORWARDER=${BENCH_FORWARDER:-$TARGET_DIR/release/forwarder}
    LOAD=$TARGET_DIR/release/examples/bench-load
    local b
    for b in "$FORWARDER" "$LOAD"; do
        [ -x "$b" ] || { echo "$1: $b is missing (run without --no-build)" >&2; exit 1; }
    done
}

STARTED_PIDS=()

# Starts "$@" in its own session (so its whole process group can be stopped by id), output to
# LOGFILE. Usage: start_bg LOGFILE cmd args...; the pid is left in $BG_PID.
start_bg() {
    local log=$1
    shift
    setsid "$@" >"$log" 2>&1 </dev/null &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# Stops one process group started by start_bg: TERM, up to 3 s to exit, then KILL.
stop_bg() {
    local pid=$1 i
    kill -TERM -- "-$pid" 2>/dev/null || return 0
    for i in $(seq 30); do
        kill -0 -- "-$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
}

# Stops every process group this script started with start_bg (newest first). Install it as
# (or call it from) the EXIT trap.
stop_all() {
    local i
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_bg "${STARTED_PIDS[$i]}"
    done
    STARTED_PIDS=()
}
