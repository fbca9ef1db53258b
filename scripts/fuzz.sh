#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on the nightly toolchain, keeping new
# inputs in fuzz/corpus/<target>, and prints executions and crashes per target. A crash leaves
# its input in fuzz/artifacts/<target>/; add it to the corpus with a fix, and `cargo test`
# checks it from then on.
#   scripts/fuzz.sh [seconds per target] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-60}"
shift || true
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked >/dev/null
fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir fuzz)
cargo +nightly fuzz build --fuzz-dir fuzz -O >/dev/null
printf '%-14s %14s %10s %8s %8s\n' target executions exec/s corpus crashes
for target in "${TARGETS[@]}"; do
    log="$(mktemp)"
    mkdir -p "fuzz/corpus/$target"
    status=0
    cargo +nightly fuzz run --fuzz-dir fuzz -O "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    corpus="$(find "fuzz/corpus/$target" -type f | wc -l)"
    crashes="$(find "fuzz/artifacts/$target" -type f 2>/dev/null | wc -l)"
    printf '%-14s %14s %10s %8s %8s\n' "$target" "${runs:-?}" "${rate:-?}" "$corpus" "$crashes"
    if [ "$status" != 0 ]; then
        echo "  $target stopped with status $status:"; grep -m5 -E 'panicked|ERROR|SUMMARY' "$log" | sed 's/^/  /'
    fi
    rm -f "$log"
done
