#!/usr/bin/env bash
# The whole test suite: finds (or starts) a PostgreSQL for the tests, installs the Sentry SDKs
# the Sentry tests drive when missing (scripts/sdks.sh), then runs every unit,
# black-box and benchmark-smoke test of the workspace, then a quick run of the benchmark
# harness (MESHER_SKIP_BENCH=1 leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."
# Black-box tests open thousands of sockets: take the hard limit of open files.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck source=scripts/test-postgres.sh
source scripts/test-postgres.sh
echo "tests use PostgreSQL at ${DATABASE_URL}"
# NATS for the tests of several nodes (tests/cluster.rs).
# shellcheck source=scripts/test-nats.sh
source scripts/test-nats.sh
# shellcheck source=scripts/browser.sh
source scripts/browser.sh
# The real Sentry SDKs (Python with and without brotli, Node) that tests/sentry_sdks.rs drives.
# shellcheck source=scripts/sdks.sh
source scripts/sdks.sh
# The benchmark harness keeps working: every scenario, small, against Mesher and both peers.
if [ "${MESHER_SKIP_BENCH:-0}" != 1 ]; then
    scripts/bench.sh --quick
fi
cargo test --workspace --all-targets "$@"
