#!/usr/bin/env bash
# Several Mesher nodes on one PostgreSQL and one NATS (PROTOCOL section 10), measured with
# mesher-load:
#   e2e       events posted to node A at 2,000/s, dashboards on node B: latency post -> delivery
#   fanout    the same fan-out work (1 publisher on node A, subscribers spread over the nodes)
#             on 3 nodes and on 1 node: deliveries per server CPU-second (all nodes' CPU)
#   conns     3 nodes, each holding 15,000 idle streams of its own mesher-load process
#   ingest    posts to one node of a cluster with no dashboards anywhere (nothing to publish
#             once the lease after each takeover has lapsed): events per server CPU-second
#
#   scripts/bench-cluster.sh [--quick] [scenario...]     (default: e2e fanout conns)
#
# PostgreSQL and NATS come from scripts/test-postgres.sh and scripts/test-nats.sh (found or
# started). Prints markdown rows; PERF.md records them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0
if [ "${1:-}" = --quick ]; then QUICK=1; shift; fi
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(e2e fanout conns)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# shellcheck source=scripts/test-postgres.sh
source scripts/test-postgres.sh
# shellcheck source=scripts/test-nats.sh
source scripts/test-nats.sh
[ -n "${MESHER_TEST_NATS_URL:-}" ] || { echo "bench-cluster: no NATS" >&2; exit 1; }
cargo build --release --workspace -q
MESHER="${MESHER_BIN:-$ROOT/target/release/mesher}"
LOAD="$ROOT/target/release/mesher-load"
ADMIN_TOKEN=bench-cluster-admin
# As in bench.sh: the servers on CPU 0, the load on CPU 1 (NATS and PostgreSQL run where the
# system puts them), so the load tool does not take the servers' CPU.
PIN_SERVER=(taskset -c 0)
PIN_LOAD=(taskset -c 1)
if [ "$(nproc)" -lt 2 ]; then PIN_SERVER=() PIN_LOAD=(); fi
PORT_BASE=${BENCH_PORT_BASE:-38080}
WORK=$(mktemp -d /tmp/mesher-bench-cluster.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# Starts $1 nodes on a fresh schema; sets NODE_URLS and NODE_PIDS.
start_nodes() {
    local count=$1 schema url
    schema="bench_$(date +%s%N)"
    psql "$DATABASE_URL" -qc "CREATE SCHEMA $schema" >/dev/null
    url="$DATABASE_URL?options=-csearch_path%3D$schema"
    NODE_URLS=() NODE_PIDS=()
    for index in $(seq 0 $((count - 1))); do
        local port=$((PORT_BASE + index)) dir="$WORK/node-$schema-$index"
        mkdir -p "$dir"
        "${PIN_SERVER[@]}" "$MESHER" serve --listen "127.0.0.1:$port" --shards 1 --data-dir "$dir" \
            --admin-token "$ADMIN_TOKEN" --database-url "$url" \
            --nats-url "$MESHER_TEST_NATS_URL" --node-id "node-$index" >"$dir/log" 2>&1 &
        NODE_PIDS+=($!)
        PIDS+=($!)
        wait_port "$port" || { tail -20 "$dir/log" >&2; exit 1; }
        NODE_URLS+=("http://127.0.0.1:$port")
    done
}

stop_nodes() {
    for pid in "${NODE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}

join() { local IFS=,; echo "$*"; }

duration=10
[ "$QUICK" = 1 ] && duration=4
for scenario in "${SCENARIOS[@]}"; do
    case "$scenario" in
    e2e)
        # Dashboards connect first, so their node owns the projects: every post to node A is
        # forwarded. The same run on one node is the baseline.
        start_nodes 2
        echo "e2e, posts to node A, dashboards on node B:" >&2
        "${PIN_LOAD[@]}" "$LOAD" e2e --url "${NODE_URLS[0]}" --stream-url "${NODE_URLS[1]}" --rate 2000 \
            --duration "$duration" --admin-token "$ADMIN_TOKEN" --server-pid "$(join "${NODE_PIDS[@]}")"
        # Each forwarded post waits for the owner's answer, and HTTP/1.1 answers a connection's
        # pipelined requests in order: 64 connections with one post each in flight, as SDKs
        # send, instead of 4 connections pipelining 16.
        for subscribers in 1000 100; do
            echo "e2e, posts to node A, $subscribers dashboards on node B, 64 connections without pipelining:" >&2
            "${PIN_LOAD[@]}" "$LOAD" e2e --url "${NODE_URLS[0]}" --stream-url "${NODE_URLS[1]}" --rate 2000 \
                --connections 64 --inflight 64 --subscribers "$subscribers" \
                --duration "$duration" --admin-token "$ADMIN_TOKEN" --server-pid "$(join "${NODE_PIDS[@]}")"
        done
        stop_nodes
        start_nodes 1
        for subscribers in 1000 100; do
            echo "e2e, one node, $subscribers dashboards, 64 connections without pipelining:" >&2
            "${PIN_LOAD[@]}" "$LOAD" e2e --url "${NODE_URLS[0]}" --rate 2000 \
                --connections 64 --inflight 64 --subscribers "$subscribers" \
                --duration "$duration" --admin-token "$ADMIN_TOKEN" --server-pid "$(join "${NODE_PIDS[@]}")"
        done
        stop_nodes
        ;;
    fanout)
        for count in 1 3; do
            start_nodes "$count"
            streams=$(join "${NODE_URLS[@]}")
            echo "fanout over $count node(s):" >&2
            "${PIN_LOAD[@]}" "$LOAD" fanout --url "${NODE_URLS[0]}" --stream-url "$streams" --subscribers 1200 \
                --duration "$duration" --admin-token "$ADMIN_TOKEN" --server-pid "$(join "${NODE_PIDS[@]}")"
            stop_nodes
        done
        ;;
    ingest)
        start_nodes 1
        echo "ingest into one node of a cluster, no dashboards:" >&2
        "${PIN_LOAD[@]}" "$LOAD" ingest --url "${NODE_URLS[0]}" --duration $((duration * 2)) \
            --admin-token "$ADMIN_TOKEN" --server-pid "$(join "${NODE_PIDS[@]}")"
        stop_nodes
        ;;
    conns)
        start_nodes 3
        per_node=15000
        [ "$QUICK" = 1 ] && per_node=2000
        loads=()
        for index in 0 1 2; do
            "${PIN_LOAD[@]}" "$LOAD" conns --url "${NODE_URLS[$index]}" --subscribers "$per_node" --duration 5 \
                --admin-token "$ADMIN_TOKEN" --server-pid "${NODE_PIDS[$index]}" \
                >"$WORK/conns-$index.md" 2>"$WORK/conns-$index.log" &
            loads+=($!)
        done
        for pid in "${loads[@]}"; do wait "$pid"; done
        grep -h "^| conns" "$WORK"/conns-*.md || cat "$WORK"/conns-*.log
        stop_nodes
        ;;
    *)
        echo "bench-cluster: unknown scenario $scenario" >&2
        exit 2
        ;;
    esac
done
