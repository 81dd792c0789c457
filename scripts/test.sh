#!/usr/bin/env bash
# The one test entry point (README, .ci/run): installs what the tests need, checks formatting and
# lints (Rust and shell), checks the documentation's links, builds the workspace once, runs every
# test. Safe to run again: installs are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step under scripts/test.d installs the Debian packages it needs (scripts/lib/apt.sh).

step() { printf '\n== %s ==\n' "$*" >&2; }

step "shellcheck (every shell script)"
bash scripts/lib/shellcheck.sh

step "links in README.md and docs/"
python3 scripts/lib/check-links.py

step "rustfmt"
cargo fmt --all -- --check

step "clippy (-D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "build"
cargo build --workspace --all-targets

step "cargo test"
# forwarder/tests/dns.rs serves names from dnsmasq in a lab namespace (ip netns).
# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages dnsmasq-base iproute2
set +e
cargo test --workspace 2>&1 | tee target/cargo-test.log
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "cargo test failed (exit $status)" >&2
    exit "$status"
fi

for extra in scripts/test.d/*.sh; do
    [ -e "$extra" ] || continue
    step "$extra"
    bash "$extra"
done

passed=$(grep -o 'test result: ok. [0-9]* passed' target/cargo-test.log | awk '{s+=$4} END {print s+0}')
echo "cargo test: $passed passed, 0 failed"
