#!/usr/bin/env bash
# What net.ipv4.tcp_migrate_req changes when a worker is killed (docs/sysctl.md): in two fresh
# network namespaces (the sysctl is per namespace; the host's value is not touched), a forwarder
# with 2 workers, one worker stopped so its accept queue fills, 400 connects, then SIGKILL of that
# worker; prints how many connections were reset with tcp_migrate_req 0 and 1.
# Usage: scripts/dev/accept-queue-reset.sh [FORWARDER_BINARY]   (root; default target/debug/forwarder)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-$root/target/debug/forwarder}
[ -x "$bin" ] || { echo "no forwarder binary at $bin (cargo build -p forwarder)" >&2; exit 1; }
cleanup() { for m in 0 1; do ip netns del "aqreset-$m" 2>/dev/null || true; done; }
trap cleanup EXIT
cleanup
for m in 0 1; do
    ip netns add "aqreset-$m"
    ip netns exec "aqreset-$m" ip link set lo up
    ip netns exec "aqreset-$m" sysctl -qw net.ipv4.tcp_migrate_req=$m
    ip netns exec "aqreset-$m" timeout 120 python3 "$root/scripts/dev/accept_queue_reset.py" "$bin"
done
