#!/usr/bin/env bash
# Runs every coverage-guided fuzz target (one file each in fuzz/src/bin/) for SECONDS each, at most
# FUZZ_JOBS (2) at a time under `nice -n 19`, from and into its corpus fuzz/corpus/<target>/, and
# prints one line per target: runs, coverage, corpus size, and the crash if any. Not part of
# scripts/test.sh: a few minutes by hand, or docs/fuzzing.md's 10 minutes a target.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]      (default 60 s, every target)
# Env: FUZZ_JOBS (2), FUZZ_MAX_LEN (4096 bytes per input).
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain RUSTC_BOOTSTRAP=1 lets it
# pass its nightly flags. Exit status: 1 if any target crashed (its input is in
# fuzz/artifacts/<target>/: make it a unit test next to the parser, see docs/fuzzing.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
secs=${1:-60}
shift || true
case $secs in '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;; esac
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
if [ $# -gt 0 ]; then targets=("$@"); else
    mapfile -t targets < <(find src/bin -name '*.rs' -printf '%f\n' | sed 's/\.rs$//' | sort)
fi
export RUSTC_BOOTSTRAP=1
# No sanitizer: the parsers are safe Rust, so a crash is a panic or an overflow, which debug
# assertions catch; ASan would only slow every run for memory errors that cannot happen there.
flags=(--sanitizer none --debug-assertions)
nice -n 10 cargo fuzz build "${flags[@]}" >/dev/null 2>build.log ||
    { cat build.log >&2; exit 1; }
mkdir -p logs
run_one() {
    local t=$1
    local rc=0
    mkdir -p "corpus/$t"
    nice -n 19 cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len="${FUZZ_MAX_LEN:-4096}" -rss_limit_mb=1024 \
        -timeout=10 -print_final_stats=1 >"logs/$t.log" 2>&1 || rc=$?
    echo "$rc" >"logs/$t.rc"
}
for t in "${targets[@]}"; do
    rm -f "logs/$t.rc"
    while [ "$(jobs -rp | wc -l)" -ge "${FUZZ_JOBS:-2}" ]; do wait -n || true; done
    run_one "$t" &
done
wait
failed=0
printf '%-20s %8s %12s %8s %8s  %s\n' target seconds runs cov corpus result
for t in "${targets[@]}"; do
    log=logs/$t.log
    rc=$(cat "logs/$t.rc" 2>/dev/null || echo "?")
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    corpus=$(find "corpus/$t" -type f | wc -l)
    result=ok
    if [ "$rc" != 0 ] || grep -q 'Test unit written to' "$log"; then
        result="CRASH: $(grep -o 'Test unit written to .*' "$log" | tail -1) (log fuzz/$log)"
        failed=1
    fi
    [ -n "$runs" ] || { result="no figures: see fuzz/$log"; failed=1; }
    printf '%-20s %8s %12s %8s %8s  %s\n' "$t" "$secs" "${runs:-?}" "${cov:-?}" "$corpus" "$result"
done
exit "$failed"
