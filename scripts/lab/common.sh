# shellcheck shell=bash
# shellcheck disable=SC2034  # names used by the other lab scripts that source this one
# Names, addresses and process plumbing shared by every part of the lab: which binaries to use,
# how a program is started inside a namespace (own hostname, raised fd limit, tracked pid) and
# stopped again, and how to wait for a condition with a deadline instead of sleeping.

# Everything the lab creates carries this prefix, so `down` can find it again after a crash.
LAB_PREFIX=fwlab
NS_SW=$LAB_PREFIX-sw            # holds the two bridges; the host's network is never touched
NS_GW=$LAB_PREFIX-gateway
NS_C1=$LAB_PREFIX-client1
NS_C2=$LAB_PREFIX-client2
NS_S1=$LAB_PREFIX-server1
NS_S2=$LAB_PREFIX-server2
NS_S3=$LAB_PREFIX-server3
LAB_NAMESPACES=("$NS_GW" "$NS_C1" "$NS_C2" "$NS_S1" "$NS_S2" "$NS_S3" "$NS_SW")

# Two segments of one private test range, joined only by the gateway (no IP forwarding there):
# clients can reach servers only through the forwarder, as in the original lab.
FRONT_NET=10.77.0.0/24
BACK_NET=10.77.1.0/24
GW_FRONT=10.77.0.1
GW_BACK=10.77.1.1
C1_ADDR=10.77.0.11
C2_ADDR=10.77.0.12
S1_ADDR=10.77.1.21
S2_ADDR=10.77.1.22
S3_ADDR=10.77.1.23

# Gateway ports (what the clients connect to) and the servers behind them.
PORT_TLS_ECHO=8005
PORT_PLAIN_ECHO=8006
PORT_CHAT=7000
PORT_SSH=22222
PORT_WEB=80
PORT_HEAVY=9000
PORT_FWD_WEB=3001 # the forwarder's web page, on the gateway's front address (case 5 asks it)
PORT_AGENT=7100   # the load client's agents on client1 and client2 (case 5)

# Run-time state lives in one fixed place so `down` works from any later invocation.
LAB_DIR=${LAB_DIR:-/tmp/fwlab}
LAB_LOCK=${LAB_LOCK:-/tmp/fwlab.lock}
LAB_RESULTS=${LAB_RESULTS:-$REPO/lab-results}

log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# in_ns NS CMD...: from the shared shell.
# shellcheck source=scripts/lib/common.sh
source "$REPO/scripts/lib/common.sh"

# Picks the directory with the workspace binaries: LAB_BIN_DIR if given (used as it is), else the
# release build, brought up to date here so that every case runs the current programs. Sets BIN_DIR
# and BIN_DIR_WHY.
pick_bin_dir() {
    if [ -n "${LAB_BIN_DIR:-}" ]; then
        BIN_DIR=$LAB_BIN_DIR
        BIN_DIR_WHY="LAB_BIN_DIR"
        return
    fi
    command -v cargo >/dev/null || die "cargo not found: install Rust, or set LAB_BIN_DIR to a directory with the built programs"
    log "building the lab's programs (cargo build --release)"
    (cd "$REPO" && cargo build --release -q -p forwarder -p ssl-echo-server -p ssl-echo-client \
        -p chat-server -p certs --bins) || die "cargo build --release failed"
    BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/release
    BIN_DIR_WHY="release build, just brought up to date"
}

bin() { printf '%s/%s' "$BIN_DIR" "$1"; }

# A program counts as built when it answers --help with a usage text; the workspace stubs either
# exit 2 saying "not built yet" or print nothing.
bin_ready() {
    local path
    path=$(bin "$1")
    [ -x "$path" ] && "$path" --help 2>&1 | grep -q 'Usage'
}

# Prints the first missing program of the list (empty and status 0 when all are built).
first_missing_bin() {
    local b
    for b in "$@"; do
        if ! bin_ready "$b"; then
            printf '%s' "$b"
            return 1
        fi
    done
    return 0
}

# lab_spawn NAME NAMESPACE HOSTNAME CMD... — starts CMD in the background inside NAMESPACE, in its own
# UTS namespace (so `hostname` there answers HOSTNAME) and its own session (so the whole process
# group can be stopped), with the open-file limit raised to the hard limit. Stdout goes to
# $LAB_DIR/logs/NAME.out, stderr to NAME.log, the pid (= process group) to $LAB_DIR/pids/NAME.
lab_spawn() {
    local name=$1 ns=$2 host=$3
    shift 3
    local pidf=$LAB_DIR/pids/$name log=$LAB_DIR/logs/$name.log
    rm -f "$pidf"
    # shellcheck disable=SC2016  # expanded by the inner shell
    ip netns exec "$ns" unshare --uts setsid bash -c \
        'echo $$ > "$1"; hostname "$2"; ulimit -n "$(ulimit -Hn)"; shift 2; exec "$@"' \
        _ "$pidf" "$host" "$@" >"$LAB_DIR/logs/$name.out" 2>"$log" </dev/null 9>&- &
    wait_until 10 "pid file of $name" test -s "$pidf"
}

proc_pid() { cat "$LAB_DIR/pids/$1" 2>/dev/null; }

proc_alive() {
    local pid
    pid=$(proc_pid "$1") || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# Waits (bounded) for a spawned process to exit on its own; status 1 on timeout.
wait_exit() {
    local pid
    pid=$(proc_pid "$1") || return 0
    wait_until "$2" "$1 to exit" bash -c "! kill -0 $pid"
}

# stop_proc NAME [SIGNAL] [group|leader] — signals the process group (or only its leader, for
# programs like tshark that stop their own children in order), waits up to 15 s, then kills the group.
stop_proc() {
    local name=$1 sig=${2:-TERM} target=${3:-group} pid
    pid=$(proc_pid "$name") || return 0
    [ -n "$pid" ] || return 0
    if [ "$target" = leader ]; then
        kill -"$sig" "$pid" 2>/dev/null || true
    else
        kill -"$sig" -- -"$pid" 2>/dev/null || kill -"$sig" "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop on SIG$sig; killing it"
        kill -KILL -- -"$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # Children that outlived their leader still belong to the group.
    kill -KILL -- -"$pid" 2>/dev/null || true
    rm -f "$LAB_DIR/pids/$name"
}

# wait_until SECONDS WHAT CMD... — polls CMD every 0.1 s until it succeeds or the deadline passes.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

listening() { # NS PORT
    [ -n "$(ip netns exec "$1" ss -Hltn "sport = :$2")" ]
}

# wait_listen NS PORT SECONDS NAME — waits until the spawned process NAME listens on PORT inside NS;
# fails at once (showing its log) if it exits first.
wait_listen() {
    local ns=$1 port=$2 seconds=$3 name=$4
    local deadline=$((SECONDS + seconds))
    until listening "$ns" "$port"; do
        if ! proc_alive "$name"; then
            log "$name exited before listening on port $port; its log:"
            tail -n 20 "$LAB_DIR/logs/$name.log" >&2
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${seconds}s waiting for $name to listen on port $port"
            return 1
        fi
        sleep 0.1
    done
}

# Number of established TCP connections on local PORT inside NS.
established_count() {
    ip netns exec "$1" ss -Htn state established "sport = :$2" | wc -l
}

PYTHON=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}

# Formats a number for people: thousands separators, at most DECIMALS (default 1) decimals.
pretty() {
    "$PYTHON" -c '
import sys
try:
    v = float(sys.argv[1])
except ValueError:
    print(sys.argv[1] or "?"); sys.exit()
d = int(sys.argv[2])
print(f"{int(v):,}" if v == int(v) else f"{v:,.{d}f}")' "${1:-?}" "${2:-1}"
}

# Reads one field of a JSON file (dotted path) with python3; prints nothing when absent.
json_get() {
    "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
try:
    v = json.load(open(sys.argv[1]))
    for k in sys.argv[2].split('.'):
        v = v[k]
    print(v)
except Exception:
    pass
PY
}
