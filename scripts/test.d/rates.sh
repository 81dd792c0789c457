#!/usr/bin/env bash
# CI step: bandwidth limits measured with iperf3, one stream and eight, through conn_rate and
# ip_rate pools (the ignored test in forwarder/tests/rates.rs). Installs iperf3; a missing
# program fails the step, nothing is skipped. Bounded: four settings, at most three 4 s runs each.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages iperf3

command -v iperf3 >/dev/null || { echo "rates: iperf3 not installed" >&2; exit 1; }
timeout 300 cargo test -q -p forwarder --test rates -- --ignored --nocapture
