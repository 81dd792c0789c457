#!/usr/bin/env bash
# CI step: the forwarder's web page end to end in headless Chromium (scripts/e2e/web.test.mjs).
# Starts echo backends and the forwarder (target/debug) on free loopback ports, runs the browser
# test, and always stops what it started. The forwarder whose changes need a token serves its
# page over HTTPS with a throwaway pair from `certs`; Chromium trusts exactly that key (its SPKI
# hash), nothing else. A third one, bound off loopback over plain HTTP, must show the warning. The screenshot goes to a temp file, or to
# $WEB_SCREENSHOT when set (WEB_SCREENSHOT=docs/img/web.png refreshes the picture in docs/web.md).
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1
root=$PWD

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
ensure_apt_packages chromium fonts-dejavu-core openssl
# nodesource's nodejs provides npm itself (and conflicts with Debian's npm package).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    ensure_apt_packages nodejs npm
fi

bin=${WEB_FORWARDER_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/forwarder}
certs_bin=$(dirname "$bin")/certs
for b in "$bin" "$certs_bin"; do
    if [ ! -x "$b" ]; then
        echo "web: $b not found: build the workspace first (cargo build --workspace)" >&2
        exit 1
    fi
done

# playwright-core from npm, installed once (npm ci again only when the lock file changed).
(
    cd scripts/e2e
    if ! node -e '
        const want = require("./package-lock.json").packages["node_modules/playwright-core"].version;
        const have = require("./node_modules/playwright-core/package.json").version;
        process.exit(want === have ? 0 : 1);' 2>/dev/null; then
        npm ci --no-audit --no-fund --loglevel=error >&2
    fi
)

work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        # Each was started with setsid: the group holds the forwarder's workers too.
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    # The forwarder drains first (the browser may hold a keep-alive): give it 5 s, then kill.
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -KILL -- "-$pid" 2>/dev/null; then
            echo "web: process group $pid still running 5 s after SIGTERM; killed" >&2
        fi
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# Free ports, all distinct, below the ephemeral range (see scripts/e2e/ports.mjs).
read -r web_port backend_a backend_b dead_port pool_port dead_pool_port new_port token_port plain_port < <(
    node scripts/e2e/ports.mjs 9
)


setsid node scripts/e2e/backend.mjs "$backend_a" "$backend_b" >"$work/backend.log" 2>&1 &
pids+=($!)
wait_port "$backend_a" 15
wait_port "$backend_b" 15

rules="$work/entries.csv"
cat >"$rules" <<EOF
# name,listen_port,dest_ip,dest_port
echo-a,$pool_port,127.0.0.1,$backend_a
echo-b,$pool_port,127.0.0.1,$backend_b
legacy-db,$dead_pool_port,127.0.0.1,$dead_port
EOF

# Started in the temp dir with a relative path, so the page shows "entries.csv".
cd "$work"
setsid "$bin" --rules entries.csv --web "127.0.0.1:$web_port" --workers 2 --health-interval-s 2 \
    --log-level info >"$work/forwarder.log" 2>&1 &
pids+=($!)
cd "$root"
if ! wait_port "$web_port" 15; then
    cat "$work/forwarder.log" >&2
    exit 1
fi

# A second forwarder whose changes need a token (a page not bound to 127.0.0.1 needs one; here
# the token is given, so it may stay on loopback: 127.0.0.2), its page over HTTPS.
token=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
mkdir "$work/token"
: >"$work/token/entries.csv"
"$certs_bin" --out "$work/certs" --san 127.0.0.2 >/dev/null
# The base64 SHA-256 of the server key's SubjectPublicKeyInfo, the form Chromium's
# --ignore-certificate-errors-spki-list takes.
spki=$(openssl x509 -in "$work/certs/server.crt" -pubkey -noout |
    openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
setsid "$bin" --rules "$work/token/entries.csv" --web "127.0.0.2:$token_port" --web-token "$token" \
    --web-cert "$work/certs/server.crt" --web-key "$work/certs/server.key" \
    --workers 1 --log-level info >"$work/forwarder-token.log" 2>&1 &
pids+=($!)
if ! wait_port "$token_port" 15; then
    cat "$work/forwarder-token.log" >&2
    exit 1
fi

# A third, bound off loopback over plain HTTP: its page must warn that the token travels in clear.
: >"$work/plain.csv"
setsid "$bin" --rules "$work/plain.csv" --web "0.0.0.0:$plain_port" --web-token "$token" \
    --workers 1 --log-level info >"$work/forwarder-plain.log" 2>&1 &
pids+=($!)
if ! wait_port "$plain_port" 15; then
    cat "$work/forwarder-plain.log" >&2
    exit 1
fi

screenshot=${WEB_SCREENSHOT:-$work/web.png}
case "$screenshot" in /*) ;; *) screenshot="$root/$screenshot" ;; esac
status=0
WEB_URL="http://127.0.0.1:$web_port/" \
    RULES_FILE="$rules" \
    BACKEND_PORT="$backend_a" \
    POOL_PORT="$pool_port" \
    DEAD_POOL_PORT="$dead_pool_port" \
    NEW_PORT="$new_port" \
    SCREENSHOT="$screenshot" \
    TOKEN_URL="https://127.0.0.2:$token_port/" \
    TOKEN_SPKI="$spki" \
    PLAIN_URL="http://127.0.0.1:$plain_port/" \
    TOKEN_RULES_FILE="$work/token/entries.csv" \
    WEB_TOKEN="$token" \
    timeout --kill-after=10 "${WEB_E2E_TIMEOUT:-240}" node scripts/e2e/web.test.mjs || status=$?

if [ "$status" -ne 0 ]; then
    echo "--- forwarder log ---" >&2
    cat "$work/forwarder.log" >&2
    echo "--- forwarder (token) log ---" >&2
    cat "$work/forwarder-token.log" >&2
    echo "--- forwarder (plain HTTP off loopback) log ---" >&2
    cat "$work/forwarder-plain.log" >&2
    echo "web: end-to-end test failed (exit $status)" >&2
    exit "$status"
fi
echo "web: end-to-end test passed (screenshot: $screenshot)" >&2
