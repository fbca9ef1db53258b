#!/usr/bin/env bash
# The request budget of this machine beside mesher's own figures, in requests per server
# CPU-second: the io_uring ceiling (examples/uring_ceiling.rs, a reply per request and nothing
# else) for GET and for the same ~1 KiB POST that mesher ingests (what receiving the body costs
# the kernel alone), mesher's GET /health, and mesher's POST /api/v1/events with ~1 KiB events
# on the embedded SQLite store. The ratios are over the GET ceiling. Server on CPU 0, wrk on
# CPU 1, keep-alive, 64 connections.
#
# The four run in turn, RUNS rounds, so that each round sees the same machine (it is shared
# and its speed drifts); each figure is the median over the rounds, and the last column is that
# median over the ceiling's; every round's figures follow the table, each with the CPU time the
# host (hypervisor) took from CPU 0 during it, which marks a round run on a busy host. Ingest CPU
# is read after the store has written every accepted event, so it includes the cost of storing
# them. Prints a markdown table.
#
# With `many` as the third argument, each ingested event's message is one of 17,576 three-letter
# words, so the store keeps ~17.5k issues live instead of one (the other rows post one event).
#
# Usage: scripts/ceiling.sh [seconds] [runs] [one|many]   (defaults 10, 3 and one)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/wrk_ingest.sh
source scripts/wrk_ingest.sh
secs=${1:-10}
runs=${2:-3}
issues=${3:-one}
case "$issues" in one|many) ;; *) echo "issues: one or many, not $issues" >&2; exit 2 ;; esac
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p mesher --bin mesher --example uring_ceiling
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Ticks the host took from CPU 0 (the server's), so that a round run on a busy host shows.
steal_ticks() { awk '/^cpu0 / {print $9}' /proc/stat; }
hz=$(getconf CLK_TCK)

taskset -c 0 target/release/examples/uring_ceiling 127.0.0.1:19001 2>/dev/null &
pids+=($!); ceiling=${pids[-1]}
taskset -c 0 target/release/mesher serve --listen 127.0.0.1:19002 --shards 1 --data-dir "$work/data" \
  --admin-token bench --queue-events 10000000 2>"$work/mesher.log" &
pids+=($!); mesher=${pids[-1]}
wrk_ingest_setup 19002 50 ceiling "ceiling run" "$work/post.lua"
cp "$work/post.lua" "$work/ingest.lua"
if [ "$issues" = many ]; then
  cat > "$work/ingest.lua" <<LUA
local headers = { ["authorization"] = "Bearer $key", ["content-type"] = "application/json" }
local letter = function() return string.char(97 + math.random(0, 25)) end
request = function()
  local word = letter() .. letter() .. letter()
  return wrk.format("POST", nil, headers, '{"message":"failure ' .. word ..
    '","level":"error","environment":"bench","tags":{"release":"1.0"},"pad":"$pad"}')
end
LUA
fi

# Waits (up to 2 minutes) until mesher's store has committed every accepted event.
store_drained() {
  for _ in $(seq 2400); do
    [ "$(curl -sf http://127.0.0.1:19002/metrics | awk '/^mesher_storage_queue_events/ {print $2}')" = 0 ] && return
    sleep 0.05
  done
  echo "mesher's store did not drain" >&2; exit 1
}

# measure NAME PID URL [wrk args...] -> appends "rps cpu per-cpu non2xx" to $work/NAME
measure() {
  local name=$1 pid=$2 url=$3; shift 3
  local before after rps cpu non2xx
  before=$(cpu_ticks "$pid")
  steal_before=$(steal_ticks)
  taskset -c 1 wrk -t1 -c64 -d"${secs}s" "$@" "$url" > "$work/wrk.txt"
  [ "$pid" = "$mesher" ] && store_drained
  after=$(cpu_ticks "$pid")
  steal=$(( $(steal_ticks) - steal_before ))
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  cpu=$(echo "($after - $before) / $hz" | bc -l)
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
  printf '%.0f %.2f %.0f %s %s\n' "$rps" "$cpu" "$(echo "$rps * $secs / $cpu" | bc -l)" "${non2xx:-0}" \
    "$steal" >> "$work/$name"
}

for _ in $(seq "$runs"); do
  measure ceiling "$ceiling" "http://127.0.0.1:19001/"
  measure ceiling_post "$ceiling" "http://127.0.0.1:19001/" -s "$work/post.lua"
  measure health "$mesher" "http://127.0.0.1:19002/health"
  measure ingest "$mesher" "http://127.0.0.1:19002/api/v1/events" -s "$work/ingest.lua"
done

median_row() { sort -n -k3 "$work/$1" | sed -n "$(( (runs + 1) / 2 ))p"; }
ceiling_per_cpu=$(median_row ceiling | awk '{print $3}')
echo "| server | requests/s | server CPU-s | requests per server CPU-s | x ceiling | non-2xx |"
echo "|---|---|---|---|---|---|"
row() {
  median_row "$2" | {
    read -r rps cpu per non2xx _
    printf '| %s | %s | %s | %s | %.2f | %s |\n' "$1" "$rps" "$cpu" "$per" \
      "$(echo "$per / $ceiling_per_cpu" | bc -l)" "$non2xx"
  }
}
row "io_uring ceiling (fixed reply)" ceiling
row "io_uring ceiling, sent the ingest POST" ceiling_post
row "mesher GET /health" health
label="~1 KiB, SQLite"; [ "$issues" = many ] && label="$label, ~17.5k issues"
row "mesher POST /api/v1/events ($label)" ingest
echo
echo "Every round, requests per server CPU-second (ceiling GET, ceiling POST, /health, ingest),"
echo "each with the CPU time the host took from CPU 0 meanwhile ([steal], in 1/${hz} s):"
per_round() { awk '{printf "%s [%s]\n", $3, $5}' "$work/$1"; }
paste <(per_round ceiling) <(per_round ceiling_post) <(per_round health) <(per_round ingest) |
  tr '\t' ' '
