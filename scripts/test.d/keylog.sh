#!/usr/bin/env bash
# SSLKEYLOGFILE end to end: installs tshark, then runs ssl-echo-client's key-log test for real
# (tshark captures a TLS run on loopback, filtered on the echo server's free port; with the key
# log every message decrypts, without it none). The cargo test run before this step skips that
# test loudly when tshark is missing; here it is required. The test kills what it starts.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages tshark

SSL_ECHO_CLIENT_KEYLOG_REQUIRED=1 timeout 600 \
    cargo test -q -p ssl-echo-client --test keylog -- --test-threads 1
