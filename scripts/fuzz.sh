#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on the nightly toolchain, keeping new
# inputs in fuzz/corpus/<target>, and prints executions and crashes per target. A crash leaves
# its input in fuzz/artifacts/<target>/; add it to the corpus with a fix, and `cargo test`
# checks it from then on.
#   scripts/fuzz.sh [seconds per target] [target ...]
# Environment:
#   MESHER_FUZZ_RUNS=N        also stop a target after N executions (whichever comes first)
#   MESHER_FUZZ_JOBS=N        run N targets at once (default 1)
#   MESHER_FUZZ_CORPUS=DIR    grow the corpora in DIR/<target> (seeded from fuzz/corpus) instead
#                             of fuzz/corpus itself; minimise them back into fuzz/corpus with
#                             scripts/fuzz.sh --merge DIR
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --merge ]; then
    # Keeps, for each target, the smallest set of inputs that covers what DIR/<target> and the
    # kept corpus cover together (libFuzzer's merge), as the new kept corpus.
    FROM="$2"
    cargo +nightly fuzz build --fuzz-dir fuzz -O >/dev/null
    for target in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
        merged="$(mktemp -d)"
        cargo +nightly fuzz run --fuzz-dir fuzz -O "$target" "$merged" "fuzz/corpus/$target" "$FROM/$target" -- \
            -merge=1 -max_len=65536 >/dev/null 2>&1
        # Seeds and inputs of fixed crashes stay under their names, whatever the merge keeps.
        find "fuzz/corpus/$target" -type f ! -name 'seed-*' ! -name 'crash-*' -delete
        cp -n "$merged"/* "fuzz/corpus/$target/" 2>/dev/null || true
        rm -rf "$merged"
        printf '%-14s %8s inputs kept\n' "$target" "$(find "fuzz/corpus/$target" -type f | wc -l)"
    done
    exit 0
fi
SECONDS_PER_TARGET="${1:-60}"
shift || true
RUNS_FLAG=()
[ -n "${MESHER_FUZZ_RUNS:-}" ] && RUNS_FLAG=(-runs="$MESHER_FUZZ_RUNS")
JOBS="${MESHER_FUZZ_JOBS:-1}"
CORPUS="${MESHER_FUZZ_CORPUS:-fuzz/corpus}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked >/dev/null
fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir fuzz)
cargo +nightly fuzz build --fuzz-dir fuzz -O >/dev/null
printf '%-14s %14s %10s %8s %8s %8s\n' target executions exec/s seconds corpus crashes
fuzz_one() {
    local target=$1 log status=0 started
    log="$(mktemp)"
    mkdir -p "$CORPUS/$target"
    [ "$CORPUS" = fuzz/corpus ] || cp -n "fuzz/corpus/$target"/* "$CORPUS/$target/" 2>/dev/null || true
    started=$(date +%s)
    cargo +nightly fuzz run --fuzz-dir fuzz -O "$target" "$CORPUS/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" "${RUNS_FLAG[@]}" -max_len=65536 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    corpus="$(find "$CORPUS/$target" -type f | wc -l)"
    # Slow-unit reports (an input over 10 s, e.g. while the machine was busy) are not failures.
    crashes="$(find "fuzz/artifacts/$target" -type f ! -name 'slow-unit-*' 2>/dev/null | wc -l)"
    printf '%-14s %14s %10s %8s %8s %8s\n' "$target" "${runs:-?}" "${rate:-?}" "$(($(date +%s) - started))" "$corpus" "$crashes"
    if [ "$status" != 0 ]; then
        echo "  $target stopped with status $status:"; grep -m5 -E 'panicked|ERROR|SUMMARY' "$log" | sed 's/^/  /'
    fi
    rm -f "$log"
}
running=0
for target in "${TARGETS[@]}"; do
    fuzz_one "$target" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait
