#!/usr/bin/env bash
# The request budget of this machine beside mesher's own figures, in requests per server
# CPU-second: the io_uring ceiling (examples/uring_ceiling.rs, a reply per request and nothing
# else), mesher's GET /health, and mesher's POST /api/v1/events with ~1 KiB events.
# Server on CPU 0, wrk on CPU 1, keep-alive, 64 connections. Prints a markdown table.
#
# Each figure is the median of RUNS runs (this machine is shared and noisy).
#
# Usage: scripts/ceiling.sh [seconds] [runs]   (defaults 10 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
runs=${2:-3}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p mesher --bin mesher --example uring_ceiling
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# measure NAME PID URL [wrk args...] -> one table row, the median run by requests per CPU-second
measure() {
  local name=$1 pid=$2 url=$3; shift 3
  local run before after rps cpu non2xx
  : > "$work/runs.txt"
  for run in $(seq "$runs"); do
    before=$(cpu_ticks "$pid")
    taskset -c 1 wrk -t1 -c64 -d"${secs}s" "$@" "$url" > "$work/wrk.txt"
    after=$(cpu_ticks "$pid")
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    cpu=$(echo "($after - $before) / $hz" | bc -l)
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
    printf '%.0f %.2f %.0f %s\n' "$rps" "$cpu" "$(echo "$rps * $secs / $cpu" | bc -l)" "${non2xx:-0}" >> "$work/runs.txt"
  done
  sort -n -k3 "$work/runs.txt" | sed -n "$(( (runs + 1) / 2 ))p" | {
    read -r rps cpu per non2xx
    printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$cpu" "$per" "$non2xx"
  }
}

echo "| server | requests/s | server CPU-s | requests per server CPU-s | non-2xx |"
echo "|---|---|---|---|---|"

taskset -c 0 target/release/examples/uring_ceiling 127.0.0.1:19001 2>/dev/null &
pids+=($!); sleep 0.5
measure "io_uring ceiling (fixed reply)" "${pids[-1]}" "http://127.0.0.1:19001/"

taskset -c 0 target/release/mesher serve --listen 127.0.0.1:19002 --shards 1 --data-dir "$work/data" \
  --admin-token bench --queue-events 10000000 2>"$work/mesher.log" &
pids+=($!); mesher=${pids[-1]}
for _ in $(seq 50); do curl -sf http://127.0.0.1:19002/health >/dev/null && break; sleep 0.1; done
measure "mesher GET /health" "$mesher" "http://127.0.0.1:19002/health"

key=$(curl -sf -X POST -H 'authorization: Bearer bench' http://127.0.0.1:19002/api/v1/projects \
  -d '{"name":"ceiling"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["ingest_key"])')
pad=$(head -c 900 /dev/zero | tr '\0' 'x')
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["authorization"] = "Bearer $key"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"message":"ceiling run","level":"error","environment":"bench","tags":{"release":"1.0"},"pad":"$pad"}'
LUA
measure "mesher POST /api/v1/events (~1 KiB)" "$mesher" "http://127.0.0.1:19002/api/v1/events" -s "$work/post.lua"
