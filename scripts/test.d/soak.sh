#!/usr/bin/env bash
# CI step: scripts/soak.sh for 60 s with the workspace's debug build — a REDUCED run of the soak
# (the documented one is 30 minutes on the release build; see docs/testing.md).
# Fails if the soak fails (a corrupted byte, an unexplained loss, a fault that did not do what it
# should, a leak, a panic or error in a log). Bounded in time; the soak stops what it started.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

secs=${SOAK_CI_SECONDS:-60}
# 2,000, not the 5,000 default: the debug build takes 20 s to open 5,000 TLS connections, so
# faults every 5 s would all land in the connect phase instead of among established traffic.
conns=${SOAK_CI_CONNECTIONS:-2000}
echo "soak: REDUCED SIZE for CI: ${secs} s with ${conns} connections on the debug build (docs/testing.md: the 30-minute release run)" >&2
export SOAK_BIN_DIR=${SOAK_BIN_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/debug}
out=${CARGO_TARGET_DIR:-$PWD/target}/soak-results
timeout --kill-after=30 "${SOAK_TIMEOUT:-900}" bash scripts/soak.sh --duration "${secs}s" --connections "$conns" --out "$out"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "soak: timed out after ${SOAK_TIMEOUT:-900}s" >&2
fi
echo "soak: results in $out (summary.md, timeseries.csv, chart.png)" >&2
exit "$status"
