#!/usr/bin/env bash
# Soak test: runs the server under mixed load for MINUTES (default 60) with storage faults
# injected midway, samples its resources every 10 s, and ends with a verdict.
#
#   scripts/soak.sh [MINUTES]
#
# - builds release; starts a throwaway PostgreSQL (scripts/test-postgres.sh) and
#   `mesher serve --shards 2` on a free port;
# - runs `mesher-load mixed` (single, bulk, WebSocket and Sentry ingest into 4 projects, 5,000
#   stream subscribers of which 5% read slowly and 1% never read, 10 stream resumes/s, an issue
#   status change per second);
# - at the midpoint restarts PostgreSQL, and FAULT_GAP_S later terminates the server's
#   PostgreSQL backends once, so that a storage write fails;
# - after the load, waits for the storage queue to empty, then checks that every event the
#   server accepted is in the `events` table, that every subscriber's deliveries are accounted
#   (received or announced as dropped), and that RSS, open files and CPU per event are flat
#   from the first tenth of the run (after WARMUP_S) to the last tenth.
#
# Exit status 0 only on a clean verdict. Everything is kept in OUT_DIR (default
# target/soak-<time>): server.log, load.log, load.json, samples.jsonl, accepted-ids.txt.
#
# Environment: SOAK_OUT_DIR overrides OUT_DIR; SOAK_SUBSCRIBERS the subscriber count.

set -euo pipefail

MINUTES=${1:-60}
DURATION_S=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 }')

# Bounds of the verdict. Allocators keep freed memory and buffers grow to the largest burst
# seen, so RSS may grow by a quarter or by 64 MiB, whichever is larger, without being a leak;
# a leak per connection or per event grows past both within an hour. Open files are the
# connections (fixed by the load) plus storage and listeners: 5% covers reconnects in flight.
# CPU per event varies with the scheduling of a shared 2-core machine; +30% is well past
# that noise and well under what a growing data structure scanned per event costs.
RSS_GROWTH_MAX_PCT=25
RSS_GROWTH_MAX_MIB=64
FILES_GROWTH_MAX_PCT=5
CPU_PER_EVENT_GROWTH_MAX_PCT=30
# Samples in the first WARMUP_S seconds are left out: buffers and caches fill, the JIT-free
# but lazily touched heap settles.
WARMUP_S=30
# The backends are terminated this long after the PostgreSQL restart (shorter in short runs,
# so that both faults happen before the last tenth).
FAULT_GAP_MAX_S=60
# The storage queue must be empty this long after the load ends.
QUEUE_EMPTY_WAIT_S=120
# The server must answer /health this long after starting.
START_WAIT_S=30

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT_DIR=${SOAK_OUT_DIR:-target/soak-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

log() {
    echo "soak [$(date -u +%H:%M:%S)]: $*" >&2
}

log "building release"
cargo build --release -p mesher-load >&2
cargo build --release >&2

MESHER_TEST_PG_FORCE_THROWAWAY=1 source scripts/test-postgres.sh
PG_DIR=$MESHER_TEST_PG_THROWAWAY_DIR
PG_BIN=$MESHER_TEST_PG_BIN_DIR

SERVER_PID=
LOAD_PID=
soak_cleanup() {
    # Only the processes this script started.
    if [ -n "$LOAD_PID" ] && kill -0 "$LOAD_PID" 2>/dev/null; then
        kill "$LOAD_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    mesher_test_pg_stop
}
trap soak_cleanup EXIT
# An interrupted run still stops what it started.
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
PORT=$((18000 + $$ % 1000))
while ! port_free "$PORT"; do PORT=$((PORT + 1)); done
URL="http://127.0.0.1:$PORT"
ADMIN_TOKEN="soak-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

# 5,000 stream connections and the server's own files.
ulimit -n "$(ulimit -Hn)"
log "starting the server on $URL (PostgreSQL: $DATABASE_URL)"
target/release/mesher serve --listen "127.0.0.1:$PORT" --shards 2 \
    --database-url "$DATABASE_URL" --admin-token "$ADMIN_TOKEN" \
    --data-dir "$OUT_DIR/data" >"$OUT_DIR/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq "$START_WAIT_S"); do
    curl -fsS "$URL/health" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS "$URL/health" >/dev/null || {
    log "the server does not answer /health"
    tail -20 "$OUT_DIR/server.log" >&2
    exit 1
}

SUBSCRIBER_ARGS=()
if [ -n "${SOAK_SUBSCRIBERS:-}" ]; then
    SUBSCRIBER_ARGS=(--subscribers "$SOAK_SUBSCRIBERS")
fi
log "mixed load for ${DURATION_S}s"
target/release/mesher-load mixed --url "$URL" --admin-token "$ADMIN_TOKEN" \
    --duration "$DURATION_S" --server-pid "$SERVER_PID" \
    --accepted-ids "$OUT_DIR/accepted-ids.txt" --samples "$OUT_DIR/samples.jsonl" \
    "${SUBSCRIBER_ARGS[@]}" --json >"$OUT_DIR/load.json" 2>"$OUT_DIR/load.log" &
LOAD_PID=$!

# The load's clock starts once its subscribers are connected.
until grep -q 'subscribers ready' "$OUT_DIR/load.log" 2>/dev/null; do
    kill -0 "$LOAD_PID" 2>/dev/null || break
    sleep 1
done
LOAD_START=$(date +%s)
log "$(grep 'subscribers ready' "$OUT_DIR/load.log" || echo 'the load ended during setup')"

HALF_S=$((DURATION_S / 2))
FAULT_GAP_S=$((HALF_S / 2 < FAULT_GAP_MAX_S ? HALF_S / 2 : FAULT_GAP_MAX_S))
sleep_until_load_s() {
    local wait=$((LOAD_START + $1 - $(date +%s)))
    [ "$wait" -gt 0 ] && sleep "$wait"
    return 0
}

if kill -0 "$LOAD_PID" 2>/dev/null; then
    sleep_until_load_s "$HALF_S"
    log "fault 1: restarting PostgreSQL"
    mesher_test_pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" \
        -m fast -w restart >/dev/null
    echo "$(date -u +%H:%M:%S) postgres restart at load ${HALF_S}s" >>"$OUT_DIR/faults.log"
    sleep_until_load_s "$((HALF_S + FAULT_GAP_S))"
    log "fault 2: terminating the server's PostgreSQL backends"
    TERMINATED=$(mesher_test_pg_psql "$DATABASE_URL" -X -Atqc \
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()")
    echo "$(date -u +%H:%M:%S) terminated $TERMINATED backends at load $((HALF_S + FAULT_GAP_S))s" \
        >>"$OUT_DIR/faults.log"
    log "terminated $TERMINATED backends"
fi

LOAD_STATUS=0
wait "$LOAD_PID" || LOAD_STATUS=$?
LOAD_PID=
tail -3 "$OUT_DIR/load.log" >&2
if [ "$LOAD_STATUS" != 0 ] || [ ! -s "$OUT_DIR/load.json" ]; then
    log "mesher-load failed (status $LOAD_STATUS); see $OUT_DIR/load.log"
    exit 1
fi

queue_depth() {
    curl -fsS "$URL/metrics" | awk '$1 == "mesher_storage_queue_events" { print $2 }'
}
QUEUE_EMPTY=no
for _ in $(seq "$QUEUE_EMPTY_WAIT_S"); do
    if [ "$(queue_depth)" = 0 ]; then
        QUEUE_EMPTY=yes
        break
    fi
    sleep 1
done
log "storage queue empty: $QUEUE_EMPTY"

ACCEPTED=$(wc -l <"$OUT_DIR/accepted-ids.txt")
# psql's \copy reads the file as this user, so the postgres server needs no access to it.
MISSING=$(mesher_test_pg_psql "$DATABASE_URL" -X -Atq -v ON_ERROR_STOP=1 <<SQL
CREATE TEMP TABLE accepted (id uuid NOT NULL);
\copy accepted FROM '$OUT_DIR/accepted-ids.txt'
SELECT count(*) FROM accepted a WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = a.id);
SQL
)
if [ "$MISSING" != 0 ]; then
    mesher_test_pg_psql "$DATABASE_URL" -X -Atq >"$OUT_DIR/missing-ids.txt" <<SQL
CREATE TEMP TABLE accepted (id uuid NOT NULL);
\copy accepted FROM '$OUT_DIR/accepted-ids.txt'
SELECT a.id FROM accepted a WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = a.id);
SQL
fi

python3 - "$OUT_DIR" "$DURATION_S" "$ACCEPTED" "$MISSING" "$QUEUE_EMPTY" "$WARMUP_S" \
    "$RSS_GROWTH_MAX_PCT" "$RSS_GROWTH_MAX_MIB" "$FILES_GROWTH_MAX_PCT" \
    "$CPU_PER_EVENT_GROWTH_MAX_PCT" <<'PY'
import json, sys

(out_dir, duration, accepted, missing, queue_empty, warmup, rss_pct, rss_mib, files_pct,
 cpu_pct) = sys.argv[1:]
duration, warmup = float(duration), float(warmup)
accepted, missing = int(accepted), int(missing)
rss_pct, rss_mib, files_pct, cpu_pct = map(float, (rss_pct, rss_mib, files_pct, cpu_pct))
load = json.load(open(f"{out_dir}/load.json"))
samples = [json.loads(line) for line in open(f"{out_dir}/samples.jsonl") if line.strip()]

# Server CPU per 1,000 stream messages written, per interval: a comparison that does not
# depend on how many messages each event cost (informational).
for before, after in zip(samples, samples[1:]):
    sent = (after.get("stream_messages_sent") or 0) - (before.get("stream_messages_sent") or 0)
    if sent > 0:
        after["cpu_per_k_messages_ms"] = (after["cpu_s"] - before["cpu_s"]) * 1e6 / sent

tenth = duration / 10
first = [s for s in samples if warmup <= s["elapsed_s"] <= warmup + tenth]
# Samples after the load (the drain) are left out: no events, so no CPU per event.
last = [s for s in samples if duration - tenth <= s["elapsed_s"] <= duration + 2]
# A short run has few samples per tenth: take at least two at each end.
if len(first) < 2:
    first = [s for s in samples if s["elapsed_s"] >= warmup][:2]
if len(last) < 2:
    last = [s for s in samples if s["elapsed_s"] <= duration + 2][-2:]

def mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")

checks = []
def check(name, ok, detail):
    checks.append(ok)
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")

print(f"soak verdict ({duration / 60:g} min, {len(samples)} samples, {out_dir})")
check("storage queue drained", queue_empty == "yes", queue_empty)
check("every accepted event stored", missing == 0 and accepted > 0,
      f"{accepted} accepted, {missing} missing from events")
subs_ok = load["unaccounted"] == 0 and load["subscribers_lost"] == 0 and load["accounted"] > 0
check("every delivery accounted", subs_ok,
      f"{load['accounted']} subscribers accounted, {load['unaccounted']} not "
      f"{load['unaccounted_list'][:3]}, {load['subscribers_lost']} lost, "
      f"{load['events_received']} events received, {load['dropped_ranges']} dropped ranges "
      f"covering {load['gap_events_in_dropped_ranges']} missed events")
if first and last:
    r0, r1 = mean(first, "rss_kib") / 1024, mean(last, "rss_kib") / 1024
    rss_bound = max(r0 * rss_pct / 100, rss_mib)
    check("RSS flat", r1 - r0 <= rss_bound,
          f"{r0:.1f} -> {r1:.1f} MiB (bound +{rss_bound:.1f} MiB)")
    f0, f1 = mean(first, "open_files"), mean(last, "open_files")
    check("open files flat", f1 <= f0 * (1 + files_pct / 100),
          f"{f0:.0f} -> {f1:.0f} (bound +{files_pct:g}%)")
    c0, c1 = mean(first, "cpu_per_event_us"), mean(last, "cpu_per_event_us")
    check("CPU per event flat", c1 <= c0 * (1 + cpu_pct / 100),
          f"{c0:.0f} -> {c1:.0f} µs (bound +{cpu_pct:g}%)")
    during = [s for s in samples if s["elapsed_s"] <= duration + 2]
    span = during[-1]["elapsed_s"] - during[0]["elapsed_s"] if len(during) > 1 else 0
    if span > 0:
        server = (during[-1]["cpu_s"] - during[0]["cpu_s"]) / span
        client = (during[-1]["client_cpu_s"] - during[0]["client_cpu_s"]) / span
        print(f"  info CPU used: server {server:.2f} cores, load client {client:.2f} cores; "
              f"{(during[-1]['accepted'] - during[0]['accepted']) / span:.0f} events/s accepted")
    m0, m1 = mean(first, "cpu_per_k_messages_ms"), mean(last, "cpu_per_k_messages_ms")
    print(f"  info server CPU per 1,000 stream messages: {m0:.1f} -> {m1:.1f} ms")
    l0, l1 = mean(first, "loop_lag_us"), mean(last, "loop_lag_us")
    print(f"  info loop lag {l0:.0f} -> {l1:.0f} µs; max seen "
          f"{max((s.get('loop_lag_max_us') or 0) for s in samples):.0f} µs")
else:
    check("resource samples", False, "too few samples")
print(f"  info paths: single {load['single']}, bulk {load['bulk']}, ws {load['ws_ingest']}, "
      f"sentry {load['sentry']}")
print(f"  info stream: {load['subscribers_ready']} subscribers ready, {load['reconnects']} "
      f"drops and resumes, {load['resumed_recovered']} resumes recovered and "
      f"{load['resumed_not_recovered']} not, "
      f"{load['unexpected_closes']} connections closed by the server and resumed "
      f"({load['slow_closes']} of slow readers), never-readers closed by the server "
      f"{load['never_readers_closed_by_server']}/{load['never_readers']}")
print(f"  info status changes: {load['status_changes_ok']} ok, "
      f"{load['status_changes_failed']} failed")
if load["error_samples"]:
    print(f"  info first errors: {load['error_samples'][:5]}")
verdict = "CLEAN" if all(checks) else "NOT CLEAN"
print(f"verdict: {verdict}")
sys.exit(0 if all(checks) else 1)
PY
