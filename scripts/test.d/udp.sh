#!/usr/bin/env bash
# CI step: UDP forwarding with a real DNS server. Installs dnsmasq and dig, then runs the ignored
# test forwarder/tests/udp_dns.rs (two dnsmasq behind one UDP pool, 1,000 dig queries from 100
# client ports). A missing program fails the step; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages dnsmasq-base bind9-dnsutils

for program in dnsmasq dig; do
    command -v "$program" >/dev/null || { echo "udp: $program not installed" >&2; exit 1; }
done
timeout 300 cargo test -q -p forwarder --test udp_dns -- --ignored
