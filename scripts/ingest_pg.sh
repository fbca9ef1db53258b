#!/usr/bin/env bash
# Sustained ingest into PostgreSQL: mesher on CPU 0 with --database-url, wrk on CPU 1 posting
# ~1 KiB events over 64 keep-alive connections for SECONDS; then the events committed per
# second (counted in the database) beside the raw COPY rate of the same rows on the same server.
# The same run measures the minimal io_uring server (examples/uring_ceiling.rs) the same way,
# before and after the ingest (this machine's speed drifts within minutes), so accepted events
# per CPU-second can be compared with the mean cost of answering a request around them.
#
# Usage: scripts/ingest_pg.sh [seconds]   (default 60; DATABASE_URL or 127.0.0.1:5432/test)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/wrk_ingest.sh
source scripts/wrk_ingest.sh
secs=${1:-60}
base_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
schema="ingest_pg_$$"
sep='?'; case "$base_url" in *\?*) sep='&' ;; esac
url="${base_url}${sep}options=-csearch_path%3D${schema}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p mesher --bin mesher --example store_rate --example uring_ceiling
work=$(mktemp -d)
pid=""
ceiling_pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  [ -n "$ceiling_pid" ] && kill "$ceiling_pid" 2>/dev/null || true
  psql "$base_url" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql "$base_url" -qc "CREATE SCHEMA $schema"
hz=$(getconf CLK_TCK)

ceiling_secs=$(( secs < 20 ? secs : 20 ))
# Requests per CPU-second of the minimal server, measured now.
measure_ceiling() {
  taskset -c 0 target/release/examples/uring_ceiling 127.0.0.1:19051 2>/dev/null &
  ceiling_pid=$!
  sleep 0.5
  local before after rps
  before=$(awk '{print $14 + $15}' "/proc/$ceiling_pid/stat")
  taskset -c 1 wrk -t1 -c64 -d"${ceiling_secs}s" http://127.0.0.1:19051/ > "$work/ceiling.txt"
  after=$(awk '{print $14 + $15}' "/proc/$ceiling_pid/stat")
  kill "$ceiling_pid"; ceiling_pid=""
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/ceiling.txt")
  echo "$rps * $ceiling_secs * $hz / ($after - $before)" | bc -l
}
ceiling_first=$(measure_ceiling)
events() { psql "$url" -tAc "SELECT count(*) FROM events"; }

taskset -c 0 target/release/mesher serve --listen 127.0.0.1:19050 --shards 1 --data-dir "$work/data" \
  --admin-token bench --database-url "$url" --queue-events 10000000 2>"$work/mesher.log" &
pid=$!
wrk_ingest_setup 19050 100 "ingest pg" "ingest run" "$work/post.lua"
rows_before=$(events)
cpu_before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
steal_ticks() { awk '/^cpu0 / {print $9}' /proc/stat; }
steal_before=$(steal_ticks)
started=$(date +%s.%N)
taskset -c 1 wrk -t1 -c64 -d"${secs}s" -s "$work/post.lua" http://127.0.0.1:19050/api/v1/events > "$work/wrk.txt"
# Everything accepted is committed within the flush interval; wait for the queue to empty, so
# that the CPU read below includes storing every accepted event.
backlog=""
for _ in $(seq 100); do
  depth=$(curl -s http://127.0.0.1:19050/metrics | awk '/^mesher_storage_queue_events/ {print $2}')
  backlog=${backlog:-$depth}
  [ "$depth" = 0 ] && break; sleep 0.1
done
cpu_after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
ended=$(date +%s.%N)
steal=$(( $(steal_ticks) - steal_before ))
rows_after=$(events)
rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
cpu=$(echo "($cpu_after - $cpu_before) / $hz" | bc -l)
committed=$(( rows_after - rows_before ))
# Mesher stops first, so that the second measurement has CPU 0 to itself as the first had.
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
ceiling_last=$(measure_ceiling)
ceiling_per_cpu=$(echo "($ceiling_first + $ceiling_last) / 2" | bc -l)
echo "| measure | value |"
echo "|---|---|"
printf '| accepted events/s (wrk, %ss, 64 connections) | %.0f |\n' "$secs" "$rps"
printf '| minimal io_uring server, requests per server CPU-second (%ss before, %ss after; mean) | %.0f, %.0f; %.0f |\n' \
  "$ceiling_secs" "$ceiling_secs" "$ceiling_first" "$ceiling_last" "$ceiling_per_cpu"
per_cpu=$(echo "$rps * $secs / $cpu" | bc -l)
printf '| accepted events per server CPU-second | %.0f |\n' "$per_cpu"
printf '| ratio to the minimal server | %.2f |\n' "$(echo "$per_cpu / $ceiling_per_cpu" | bc -l)"
printf '| non-2xx answers | %s |\n' "${non2xx:-0}"
printf '| events committed (counted in PostgreSQL) | %d |\n' "$committed"
printf '| events committed per second, sustained | %.0f |\n' "$(echo "$committed / ($ended - $started)" | bc -l)"
# A backlog means PostgreSQL fell behind: the queued events are fresh memory the server pays
# for too. Steal is CPU time the host took from CPU 0: a busy host skews every figure.
printf '| events waiting for storage when wrk stopped | %s |\n' "${backlog:-unknown}"
printf '| CPU time the host took from CPU 0 during the ingest | %.1f%% |\n' \
  "$(echo "100 * $steal / $hz / ($ended - $started)" | bc -l)"
target/release/examples/store_rate --rows 200000 --database-url "$url" | sed -n 's/^| raw COPY/| raw COPY rate of the same rows/p; s/^| postgres store commit/| store backend commit rate of the same rows/p'
