#!/usr/bin/env bash
# Two real chat-client windows chatting through a real chat-server under Xvfb, captured side by
# side into one PNG. A third user (carol) is a plain socket in this script: she says a few things
# first (so the windows show history), and her socket tells us when each step has reached the
# server, so the script waits on conditions instead of guessing.
#
# Usage: scripts/chat-screenshot.sh [OUT.png] [SCALE]      (defaults: docs/img/chat.png, 1)
# Binaries: $CHAT_BIN_DIR (default target/debug); build with cargo build -p chat-server -p chat-client.
# Output size: (2 * 800 + 12) x 520 pixels, times SCALE.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages xvfb xdotool imagemagick

out=${1:-docs/img/chat.png}
scale=${2:-1}
bin=${CHAT_BIN_DIR:-target/debug}
for b in chat-server chat-client; do
    [ -x "$bin/$b" ] || { echo "chat-screenshot: $bin/$b not found; build it first (cargo build -p $b)" >&2; exit 1; }
done
case $scale in 1 | 1.0 | 1.25 | 1.5 | 2 | 2.0) ;; *) echo "chat-screenshot: scale must be 1, 1.25, 1.5 or 2" >&2; exit 1 ;; esac

# Window size in pixels at this scale (the client opens 860x560 logical; we resize to 800x520).
px() { awk -v v="$1" -v s="$scale" 'BEGIN { printf "%d", v * s + 0.5 }'; }
win_w=$(px 800)
win_h=$(px 520)
gap=12
shot_w=$((2 * win_w + gap))

work=$(mktemp -d)
pids=()
cleanup() {
    local p
    exec 3>&- 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "chat-screenshot: $*" >&2
    for f in "$work"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
    exit 1
}

# Polls "$@" every 0.1 s for up to $1 seconds.
wait_for() {
    local secs=$1
    shift
    local i
    for ((i = 0; i < secs * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

port_free() { ! (exec 9<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_busy() { ! port_free "$1"; }

# A display and a port nobody uses.
for ((n = 90 + RANDOM % 100; ; n++)); do [ -e "/tmp/.X11-unix/X$n" ] || [ -e "/tmp/.X$n-lock" ] || break; done
display=:$n
for ((port = 20000 + RANDOM % 10000; ; port++)); do port_free "$port" && break; done

Xvfb "$display" -screen 0 "$((shot_w + 100))x$((win_h + 100))x24" -nolisten tcp >"$work/xvfb.log" 2>&1 &
pids+=($!)
export DISPLAY=$display
wait_for 20 xdotool getmouselocation >/dev/null 2>&1 || fail "Xvfb did not start on $display"

"$bin/chat-server" --listen "127.0.0.1:$port" --history 20 --log-level warn >"$work/server.log" 2>&1 &
pids+=($!)
wait_for 20 port_busy "$port" || fail "chat-server did not listen on port $port"

# carol: a plain socket on fd 3.
exec 3<>"/dev/tcp/127.0.0.1/$port"
say() { printf '%s\n' "$1" >&3; }
# Reads carol's socket until a line matches the regex $1 (at most $2 seconds).
expect() {
    local line deadline=$((SECONDS + ${2:-60}))
    while ((SECONDS < deadline)); do
        IFS= read -r -t 1 line <&3 || continue
        [[ $line =~ $1 ]] && return 0
    done
    fail "carol never saw /$1/"
}
say carol
expect '^OK carol '
say "Morning all. Forwarder build is green, load test starts at 10."
expect '^MSG .* carol Morning all'
say "I'll keep this chat open while it runs, shout if anything lags."
expect '^MSG .* carol I.ll keep'

export XDG_RUNTIME_DIR="$work/run"
mkdir -m 700 "$XDG_RUNTIME_DIR"
# Chat as $1 in a window titled "chat $1"; sets $wid to its window id. (Not a $(...) function:
# the client's pid must be recorded in this shell for the cleanup.)
open_client() {
    TESTBED_CHAT_CONFIG="$work/$1.json" "$bin/chat-client" --host 127.0.0.1 --port "$port" --nick "$1" \
        --connect --scale "$scale" --title "chat $1" >"$work/client-$1.log" 2>&1 &
    pids+=($!)
    wid=$(timeout 60 xdotool search --sync --name "^chat $1\$" | head -1) || fail "window of $1 never appeared"
}
open_client alice
wid_a=$wid
expect '^JOIN .* alice$'
open_client bob
wid_b=$wid
expect '^JOIN .* bob$'
xdotool windowsize --sync "$wid_a" "$win_w" "$win_h" windowmove --sync "$wid_a" 0 0
xdotool windowsize --sync "$wid_b" "$win_w" "$win_h" windowmove --sync "$wid_b" "$((win_w + gap))" 0

# Types a line into a window and presses Enter; waits until the server broadcast it.
type_in() {
    local wid=$1 nick=$2 text=$3
    # The input line has the keyboard focus from the moment the client joined; no click needed
    # (a click right after a resize could hit the layout of the frame before it).
    xdotool windowfocus --sync "$wid"
    xdotool type --delay 15 "$text"
    xdotool key Return
    expect "^MSG .* $nick ${text:0:12}"
}
type_in "$wid_a" alice "Hi bob, are you seeing the load numbers?"
type_in "$wid_b" bob "Yes: 1,000 TLS sessions up, chat still instant here."
say "Nice. Leaving it running over lunch."
expect '^MSG .* carol Nice'
type_in "$wid_a" alice "Great, I'll post the report when it finishes."

# Capture once the picture stops changing (the last message has been painted in both windows).
prev=""
for ((i = 0; i < 50; i++)); do
    import -window root -crop "${shot_w}x${win_h}+0+0" +repage "$work/shot.png"
    sum=$(md5sum <"$work/shot.png")
    [ "$sum" = "$prev" ] && break
    prev=$sum
    sleep 0.2
done
mkdir -p "$(dirname "$out")"
cp "$work/shot.png" "$out"
echo "chat-screenshot: wrote $out (${shot_w}x${win_h})"
