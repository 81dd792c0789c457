#!/usr/bin/env bash
# Proves the real chat-client window works: runs scripts/chat-screenshot.sh (Xvfb, chat-server, two
# chat-client windows typing to each other) into a temporary file and checks it wrote a PNG of the
# expected size with real content. Bounded in time; every process it started is gone afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages xvfb xdotool imagemagick

limit_s=${CHAT_SHOT_TIMEOUT:-240}
expect_size="1612x520" # (2 * 800 + 12) x 520 at scale 1, see chat-screenshot.sh
tmp=$(mktemp -d)
pid=""
cleanup() {
    # The screenshot script runs in its own session: signal the whole group, then make sure.
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# Background jobs in a script are not group leaders, so setsid runs the script itself (same pid)
# as the leader of a new process group.
setsid bash scripts/chat-screenshot.sh "$tmp/chat.png" 1 >"$tmp/log" 2>&1 &
pid=$!
for ((i = 0; i < limit_s * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$pid" 2>/dev/null; then
    cat "$tmp/log" >&2
    echo "chat: screenshot script still running after ${limit_s}s" >&2
    exit 1
fi
status=0
wait "$pid" || status=$?
pid=""
if [ "$status" -ne 0 ]; then
    cat "$tmp/log" >&2
    echo "chat: screenshot script failed (exit $status)" >&2
    exit 1
fi

[ -s "$tmp/chat.png" ] || { echo "chat: no screenshot written" >&2; exit 1; }
size=$(identify -format '%wx%h' "$tmp/chat.png")
colours=$(identify -format '%k' "$tmp/chat.png")
if [ "$size" != "$expect_size" ]; then
    echo "chat: screenshot is $size, expected $expect_size" >&2
    exit 1
fi
# A blank or black window has a handful of colours; text with coloured names has hundreds.
if [ "$colours" -lt 100 ]; then
    echo "chat: screenshot has only $colours colours; the windows look empty" >&2
    exit 1
fi
echo "chat: two chat-client windows chatted under Xvfb; screenshot $size with $colours colours"
