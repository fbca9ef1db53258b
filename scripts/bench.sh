#!/usr/bin/env bash
# Benchmarks Mesher against its peers (Nchan, Sockudo, Bugsink) on loopback with mesher-load.
#
#   scripts/bench.sh [--quick] [--runs N] [--scenarios a,b] [--targets mesher,nchan,sockudo,bugsink]
#   (resume and sentry_native run against Mesher only; sentry against Mesher and Bugsink; Bugsink runs only sentry)
#                    [--load-args "--inflight 8 ..."]
#
# Installs what is missing (nginx + nchan from Debian, sockudo from crates.io, bugsink from PyPI
# into target/peers/bugsink), builds mesher and
# mesher-load in release, then for each scenario and target starts a fresh server pinned to CPU 0,
# runs the load pinned to CPU 1, stops the server by pid, and prints a markdown table for PERF.md
# (the median run of each cell by work per server CPU-second, and the mesher/peer ratio).
# --quick runs every scenario small (all of them in about two minutes); --runs N repeats each
# cell; --load-args are added to every mesher-load run (they override the scenario's sizes).
# Environment: BENCH_RESULTS=DIR keeps the raw JSON results, BENCH_PORT_BASE moves the ports
# (base .. base+4), MESHER_BIN runs that server binary instead of building one, MESHER_ARGS adds
# server flags (e.g. "--stall-timeout 120 --pong-timeout 120" so that the slow scenario's
# clients outlive their 60 s pause instead of being disconnected at 30 s, as by default).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
RUNS=1
SCENARIOS="fanout,rooms,slow,filters,ingest,e2e,conns,resume,sentry,sentry_native"
TARGETS="mesher,nchan,sockudo,bugsink"
LOAD_ARGS=""
PORT_BASE="${BENCH_PORT_BASE:-18080}"
ADMIN_TOKEN="bench-admin-token"
APP_ID="bench"
APP_KEY="bench-key"
APP_SECRET="bench-secret"
SERVER_CPU=0
LOAD_CPU=1

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --runs) RUNS="$2"; shift ;;
    --scenarios) SCENARIOS="$2"; shift ;;
    --targets) TARGETS="$2"; shift ;;
    --load-args) LOAD_ARGS="$2"; shift ;;
    -h | --help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done

log() { echo "bench: $*" >&2; }

WORK="$(mktemp -d /tmp/mesher-bench.XXXXXX)"
SERVER_PIDS=()

stop_servers() {
    local pid
    for pid in "${SERVER_PIDS[@]:-}"; do
        [ -n "$pid" ] || continue
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PIDS=()
}

cleanup() {
    stop_servers
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Pinning needs two CPUs; on one CPU everything shares it (and the figures say less). These are
# command prefixes, not functions, so that `$!` of a background server is the server's own pid.
if [ "$(nproc)" -lt 2 ]; then
    log "fewer than 2 CPUs: not pinning"
    PIN_SERVER=()
    PIN_LOAD=()
else
    PIN_SERVER=(taskset -c "$SERVER_CPU")
    PIN_LOAD=(taskset -c "$LOAD_CPU")
fi

has_target() { [[ ",$TARGETS," == *",$1,"* ]]; }
has_scenario() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
drop_target() { TARGETS="$(echo ",$TARGETS," | sed "s/,$1,/,/; s/^,//; s/,\$//")"; }

# Which targets run which scenario: resume is Mesher's alone, sentry is Mesher's and Bugsink's,
# and Bugsink (an error tracker, not a pub/sub server) runs only sentry.
runs_on() {
    case "$1/$2" in
    */mesher | sentry/bugsink) return 0 ;;
    resume/* | sentry/* | sentry_native/* | */bugsink) return 1 ;;
    *) return 0 ;;
    esac
}

# ---- install -----------------------------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
if has_target nchan && { ! command -v nginx >/dev/null || [ ! -f "$NCHAN_MODULE" ]; }; then
    log "installing nginx-light and libnginx-mod-nchan"
    apt_install nginx-light libnginx-mod-nchan || true
fi
if has_target nchan && { ! command -v nginx >/dev/null || [ ! -f "$NCHAN_MODULE" ]; }; then
    log "nchan: install failed; skipping the nchan target"
    TARGETS="$(echo ",$TARGETS," | sed 's/,nchan,/,/; s/^,//; s/,$//')"
fi

if ! command -v python3 >/dev/null; then
    apt_install python3
fi

SOCKUDO_BIN="$(command -v sockudo || echo "$HOME/.cargo/bin/sockudo")"
if has_target sockudo && [ ! -x "$SOCKUDO_BIN" ]; then
    command -v protoc >/dev/null || apt_install protobuf-compiler || true
    log "installing sockudo from crates.io (about 10 minutes on 2 cores)"
    if nice -n 19 cargo install sockudo --locked >"$WORK/sockudo-install.log" 2>&1; then
        SOCKUDO_BIN="$HOME/.cargo/bin/sockudo"
    else
        log "sockudo: install failed (see the tail below); skipping the sockudo target"
        tail -5 "$WORK/sockudo-install.log" >&2 || true
    fi
fi
if has_target sockudo && [ ! -x "$SOCKUDO_BIN" ]; then
    TARGETS="$(echo ",$TARGETS," | sed 's/,sockudo,/,/; s/^,//; s/,$//')"
fi

# Bugsink: a virtualenv under the build directory, and (once per Bugsink version) a migrated
# SQLite template with one project, copied for every run so that each starts from the same state.
BUGSINK_DIR="$ROOT/target/peers/bugsink"
BUGSINK_PY="$BUGSINK_DIR/bin/python3"
if has_target bugsink && ! has_scenario sentry; then
    drop_target bugsink
fi
if has_target bugsink && [ ! -x "$BUGSINK_DIR/bin/gunicorn" ]; then
    log "installing bugsink from PyPI into $BUGSINK_DIR"
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv || true
    rm -rf "$BUGSINK_DIR"
    if ! { python3 -m venv "$BUGSINK_DIR" &&
        timeout 600 "$BUGSINK_DIR/bin/pip" install -q --disable-pip-version-check bugsink; } \
        >"$WORK/bugsink-install.log" 2>&1; then
        log "bugsink: install failed (see the tail below); skipping the bugsink target"
        tail -5 "$WORK/bugsink-install.log" >&2 || true
        rm -rf "$BUGSINK_DIR"
    fi
fi

# Writes Bugsink's settings for a run in DIR listening on PORT: the singleserver template (SQLite,
# the snappea background worker for digests), no quota (its defaults refuse a benchmark's volume
# within seconds), no phone-home (no internet here), plain http on loopback.
bugsink_conf() {
    local dir="$1" port="$2"
    "$BUGSINK_DIR/bin/bugsink-create-conf" --template singleserver --base-dir "$dir" \
        --host 127.0.0.1 --port "$port" -o "$dir/bugsink_conf.py" >/dev/null || return 1
    cat >>"$dir/bugsink_conf.py" <<EOF

# scripts/bench.sh
BUGSINK["BASE_URL"] = "http://127.0.0.1:$port"
BUGSINK["PHONEHOME"] = False
for _quota in ("MAX_EVENTS_PER_PROJECT_PER_5_MINUTES", "MAX_EVENTS_PER_PROJECT_PER_HOUR",
               "MAX_EVENTS_PER_PROJECT_PER_MONTH", "MAX_EVENTS_PER_5_MINUTES", "MAX_EVENTS_PER_HOUR",
               "MAX_EVENTS_PER_MONTH"):
    BUGSINK[_quota] = 10**12
ALLOWED_HOSTS = ["127.0.0.1"]
SESSION_COOKIE_SECURE = False
CSRF_COOKIE_SECURE = False
EOF
}

bugsink_manage() {
    local dir="$1"
    shift
    (cd "$dir" && "$BUGSINK_DIR/bin/bugsink-manage" "$@")
}

BUGSINK_TEMPLATE=""
if has_target bugsink && [ -x "$BUGSINK_DIR/bin/gunicorn" ]; then
    version="$("$BUGSINK_PY" -c 'import importlib.metadata as m; print(m.version("bugsink"))' 2>/dev/null || echo unknown)"
    BUGSINK_TEMPLATE="$BUGSINK_DIR/template-$version"
    if [ ! -s "$BUGSINK_TEMPLATE/project" ]; then
        log "bugsink $version: migrating a template database with one project"
        rm -rf "$BUGSINK_TEMPLATE"
        mkdir -p "$BUGSINK_TEMPLATE"
        if bugsink_conf "$BUGSINK_TEMPLATE" 8000 &&
            bugsink_manage "$BUGSINK_TEMPLATE" migrate -v 0 >"$WORK/bugsink-setup.log" 2>&1 &&
            bugsink_manage "$BUGSINK_TEMPLATE" migrate --database=snappea -v 0 >>"$WORK/bugsink-setup.log" 2>&1 &&
            bugsink_manage "$BUGSINK_TEMPLATE" shell -v 0 -c '
from projects.models import Project
p = Project.objects.create(name="bench", slug="bench")
print("PROJECT", p.id, p.sentry_key.hex)' 2>>"$WORK/bugsink-setup.log" |
            sed -n 's/^PROJECT //p' >"$BUGSINK_TEMPLATE/project.tmp" &&
            [ -s "$BUGSINK_TEMPLATE/project.tmp" ]; then
            mv "$BUGSINK_TEMPLATE/project.tmp" "$BUGSINK_TEMPLATE/project"
        else
            log "bugsink: setup failed (see the tail below); skipping the bugsink target"
            tail -5 "$WORK/bugsink-setup.log" >&2 || true
            rm -rf "$BUGSINK_TEMPLATE"
            BUGSINK_TEMPLATE=""
        fi
    fi
fi
if has_target bugsink && [ -z "$BUGSINK_TEMPLATE" ]; then
    drop_target bugsink
fi

# ---- build ---------------------------------------------------------------------------------------

cd "$ROOT"
log "building mesher-load"
cargo build --release -p mesher-load >&2
LOAD="$ROOT/target/release/mesher-load"
MESHER="${MESHER_BIN:-$ROOT/target/release/mesher}"
if has_target mesher && [ -n "${MESHER_BIN:-}" ]; then
    log "mesher: using MESHER_BIN=$MESHER_BIN (not building)"
elif has_target mesher; then
    log "building mesher"
    if ! cargo build --release -p mesher >&2; then
        log "mesher: build failed; skipping the mesher target"
        TARGETS="$(echo ",$TARGETS," | sed 's/,mesher,/,/; s/^,//; s/,$//')"
    fi
fi
if [ -z "$TARGETS" ]; then
    log "no target left to run"
    exit 1
fi

# ---- servers -------------------------------------------------------------------------------------

wait_port() {
    local port="$1" pid="$2"
    for _ in $(seq 200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# Each start_* sets SERVER_URL and MEASURE_PIDS (comma-separated pids whose CPU/RSS count).
start_mesher() {
    local port="$PORT_BASE" dir="$WORK/mesher"
    rm -rf "$dir"
    mkdir -p "$dir"
    # shellcheck disable=SC2086 # MESHER_ARGS is split into flags on purpose
    "${PIN_SERVER[@]}" "$MESHER" serve --listen "127.0.0.1:$port" --shards 1 --data-dir "$dir/data" \
        --admin-token "$ADMIN_TOKEN" ${MESHER_ARGS:-} >"$dir/server.log" 2>&1 &
    local pid=$!
    SERVER_PIDS+=("$pid")
    wait_port "$port" "$pid" || { tail -20 "$dir/server.log" >&2; return 1; }
    SERVER_URL="http://127.0.0.1:$port"
    MEASURE_PIDS="$pid"
}

start_nchan() {
    local port=$((PORT_BASE + 1)) dir="$WORK/nginx"
    rm -rf "$dir"
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
load_module $NCHAN_MODULE;
worker_processes 1;
worker_rlimit_nofile 40000;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections 30000;
}
http {
    access_log off;
    # Publishers use keep-alive connections for the whole run.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /pub {
            nchan_publisher;
            nchan_channel_id \$arg_ch;
        }
        location = /pubm {
            nchan_publisher;
            nchan_channel_id \$arg_ch \$arg_ch2;
        }
        location = /sub {
            nchan_subscriber websocket;
            nchan_channel_id \$arg_ch;
        }
    }
}
EOF
    "${PIN_SERVER[@]}" nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/stderr.log" 2>&1 &
    local pid=$!
    SERVER_PIDS+=("$pid")
    wait_port "$port" "$pid" || { cat "$dir/stderr.log" "$dir/error.log" >&2 2>/dev/null; return 1; }
    local worker=""
    for _ in $(seq 50); do
        worker="$(pgrep -P "$pid" | head -1 || true)"
        [ -n "$worker" ] && break
        sleep 0.05
    done
    SERVER_URL="http://127.0.0.1:$port"
    MEASURE_PIDS="$pid${worker:+,$worker}"
}

start_sockudo() {
    local port=$((PORT_BASE + 2)) dir="$WORK/sockudo"
    rm -rf "$dir"
    mkdir -p "$dir"
    cat >"$dir/config.json" <<EOF
{
  "debug": false,
  "host": "127.0.0.1",
  "port": $port,
  "adapter": { "driver": "local" },
  "queue": { "driver": "none" },
  "cache": { "driver": "memory" },
  "rate_limiter": { "enabled": false },
  "metrics": { "enabled": true, "host": "127.0.0.1", "port": $((PORT_BASE + 3)) },
  "app_manager": {
    "driver": "memory",
    "array": {
      "apps": [
        {
          "id": "$APP_ID",
          "key": "$APP_KEY",
          "secret": "$APP_SECRET",
          "enabled": true,
          "enable_client_messages": false,
          "max_connections": 100000,
          "max_backend_events_per_second": 100000000,
          "max_client_events_per_second": 1000
        }
      ]
    }
  }
}
EOF
    "${PIN_SERVER[@]}" "$SOCKUDO_BIN" --config "$dir/config.json" >"$dir/server.log" 2>&1 &
    local pid=$!
    SERVER_PIDS+=("$pid")
    wait_port "$port" "$pid" || { tail -20 "$dir/server.log" >&2; return 1; }
    SERVER_URL="http://127.0.0.1:$port"
    MEASURE_PIDS="$pid"
}

# Bugsink, pinned like the others: gunicorn (3 sync workers, gunicorn's 2 x CPUs + 1 for the one
# CPU it has) answers ingest, snappea digests in the background; all their processes are measured.
# The template's project gives the DSN. A few envelopes go first, so that every worker has
# imported its code before the measurement.
start_bugsink() {
    local port=$((PORT_BASE + 4)) dir="$WORK/bugsink"
    rm -rf "$dir"
    mkdir -p "$dir"
    bugsink_conf "$dir" "$port" || return 1
    cp "$BUGSINK_TEMPLATE/db.sqlite3" "$BUGSINK_TEMPLATE/snappea.sqlite3" "$dir/"
    (cd "$dir" && exec "${PIN_SERVER[@]}" "$BUGSINK_DIR/bin/gunicorn" --bind "127.0.0.1:$port" \
        --workers 3 --graceful-timeout 2 --access-logfile /dev/null bugsink.wsgi) >"$dir/gunicorn.log" 2>&1 &
    local pid=$!
    SERVER_PIDS+=("$pid")
    (cd "$dir" && exec "${PIN_SERVER[@]}" "$BUGSINK_DIR/bin/bugsink-runsnappea") >"$dir/snappea.log" 2>&1 &
    local snappea=$!
    SERVER_PIDS+=("$snappea")
    wait_port "$port" "$pid" || { tail -20 "$dir/gunicorn.log" >&2; return 1; }
    local project_id key
    read -r project_id key <"$BUGSINK_TEMPLATE/project"
    BUGSINK_DSN="http://$key@127.0.0.1:$port/$project_id"
    "$BUGSINK_PY" - "$port" "$project_id" "$key" <<'PY' || { tail -20 "$dir/gunicorn.log" >&2; return 1; }
import gzip, json, sys, urllib.request, uuid
port, project, key = sys.argv[1:4]
for _ in range(9):
    event_id = uuid.uuid4().hex
    event = json.dumps({"event_id": event_id, "level": "error", "platform": "python",
                        "message": "bench warm-up"})
    body = f'{{"event_id":"{event_id}"}}\n{{"type":"event"}}\n{event}\n'.encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/{project}/envelope/", data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/x-sentry-envelope",
                 "X-Sentry-Auth": f"Sentry sentry_key={key}, sentry_version=7"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200, reply.status
PY
    local workers
    workers="$(pgrep -P "$pid" | paste -sd, -)"
    SERVER_URL="http://127.0.0.1:$port"
    MEASURE_PIDS="$pid${workers:+,$workers},$snappea"
}

# ---- scenarios -----------------------------------------------------------------------------------

# Arguments of each scenario in --quick mode (the full mode uses mesher-load's defaults, which
# follow shared/BENCHMARKING.md).
quick_args() {
    case "$1" in
    fanout) echo "--subscribers 200 --duration 2" ;;
    rooms) echo "--projects 50 --subscribers 500 --duration 2" ;;
    slow) echo "--subscribers 200 --slow-secs 3 --duration 4 --event-bytes 2048" ;;
    filters) echo "--subscribers 200 --duration 2" ;;
    ingest) echo "--connections 16 --duration 2" ;;
    e2e) echo "--subscribers 200 --rate 500 --duration 2" ;;
    conns) echo "--subscribers 1000 --duration 1" ;;
    resume) echo "--subscribers 200 --duration 3" ;;
    # Offered at a steady rate both ways, below what the store writes: unpaced, the native path
    # outruns the SQLite writer and the storage queue's 503s would count as errors.
    sentry | sentry_native) echo "--connections 8 --duration 3 --settle-max 15 --rate 12000" ;;
    *) echo "" ;;
    esac
}

RESULTS="$WORK/results"
mkdir -p "$RESULTS"
IFS=',' read -r -a scenario_list <<<"$SCENARIOS"
IFS=',' read -r -a target_list <<<"$TARGETS"
for scenario in "${scenario_list[@]}"; do
    for target in "${target_list[@]}"; do
        if [ "$scenario" = resume ] && [ "$target" != mesher ]; then
            log "resume / $target: skipped, $target has no resume (Mesher only)"
            continue
        fi
        if ! runs_on "$scenario" "$target"; then
            continue
        fi
        for run in $(seq "$RUNS"); do
            log "$scenario / $target (run $run of $RUNS)"
            if ! "start_$target"; then
                log "$target did not start; skipping"
                stop_servers
                continue
            fi
            extra=""
            [ "$QUICK" = 1 ] && extra="$(quick_args "$scenario")"
            extra="$extra $LOAD_ARGS"
            [ "$target" = bugsink ] && extra="--dsn $BUGSINK_DSN $extra"
            # shellcheck disable=SC2086
            if ! "${PIN_LOAD[@]}" "$LOAD" "$scenario" --target "$target" --url "$SERVER_URL" \
                --admin-token "$ADMIN_TOKEN" --app-id "$APP_ID" --app-key "$APP_KEY" \
                --app-secret "$APP_SECRET" --server-pid "$MEASURE_PIDS" --json $extra \
                >"$RESULTS/$scenario.$target.$run.json"; then
                log "$scenario / $target failed"
                rm -f "$RESULTS/$scenario.$target.$run.json"
            fi
            stop_servers
        done
    done
done

if [ -n "${BENCH_RESULTS:-}" ]; then
    mkdir -p "$BENCH_RESULTS"
    cp "$RESULTS"/*.json "$BENCH_RESULTS"/ 2>/dev/null || true
    log "raw results copied to $BENCH_RESULTS"
fi

# ---- table ---------------------------------------------------------------------------------------

echo
echo "$(date -u +%Y-%m-%d) $(nproc) CPUs, $(uname -r); server on CPU $SERVER_CPU, load on CPU $LOAD_CPU$([ "$QUICK" = 1 ] && echo ', --quick')"
echo
python3 - "$RESULTS" "$SCENARIOS" "$TARGETS" <<'PY'
import json, os, statistics, sys

results_dir, scenarios, targets = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
cells = {}
for name in sorted(os.listdir(results_dir)):
    scenario, target, _run, _ = name.split(".")
    try:
        with open(os.path.join(results_dir, name)) as f:
            row = json.loads(f.read().strip().splitlines()[-1])
    except (ValueError, IndexError):
        continue
    cells.setdefault((scenario, target), []).append(row)

def key_figure(row):
    if row["scenario"] == "resume":
        return row.get("resumes_per_server_cpu_s") or 0
    if row["scenario"] == "conns":
        return row.get("upgrades_per_server_cpu_s") or row.get("upgrades_per_s") or 0
    return row.get("deliveries_per_server_cpu_s") or row.get("deliveries_per_s") or 0

def runs_on(scenario, target):
    # As runs_on in the shell above: Bugsink runs only sentry, sentry runs on Mesher and Bugsink.
    if target == "mesher":
        return True
    if scenario == "sentry" or target == "bugsink":
        return scenario == "sentry" and target == "bugsink"
    return scenario not in ("resume", "sentry_native")

def median_row(rows):
    rows = sorted(rows, key=key_figure)
    return rows[(len(rows) - 1) // 2]

def fmt(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"

print("| scenario | target | runs | sent | deliveries/s | per server CPU-s | mesher/peer | p50 µs | p99 µs | p99.9 µs | dropped | wrong | missing | RSS MiB | errors | notes |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for scenario in scenarios:
    mesher = cells.get((scenario, "mesher"))
    mesher_figure = key_figure(median_row(mesher)) if mesher else None
    for target in targets:
        rows = cells.get((scenario, target))
        if scenario == "resume" and target != "mesher":
            print(f"| {scenario} | {target} | 0 | | | | | | | | | | | | | not run: {target} has no resume |")
            continue
        if not runs_on(scenario, target):
            continue
        if not rows:
            print(f"| {scenario} | {target} | 0 | | | | | | | | | | | | | no result |")
            continue
        r = median_row(rows)
        ratio = "-"
        if target != "mesher" and mesher_figure and key_figure(r):
            ratio = f"{mesher_figure / key_figure(r):.2f}"
        rss = r.get("rss_peak_kib") or r.get("rss_kib")
        if scenario == "conns":
            notes = (f"{fmt(r.get('upgrades_per_s'))} upgrades/s, "
                     f"{fmt(r.get('upgrades_per_server_cpu_s'))} per server CPU-s, "
                     f"{fmt(r.get('rss_per_conn_bytes'))} B/conn, idle CPU {fmt(r.get('idle_cpu_pct'), 2)}%")
            print(f"| {scenario} | {target} | {len(rows)} | {r.get('subscribers_ready')} conns | - | - | {ratio} "
                  f"| - | - | - | - | - | - | {fmt((rss or 0) / 1024, 1)} | {r.get('errors')} | {notes} |")
            continue
        if scenario == "resume":
            notes = (f"{fmt(r.get('resumes'))} resumes ({fmt(r.get('recovered'))} recovered, "
                     f"{fmt(r.get('replayed'))} messages replayed) at {fmt(r.get('resume_rate'))}/s, "
                     f"{fmt(r.get('resumes_per_server_cpu_s'))} resumes per server CPU-s; "
                     f"latency = new connection to `resumed`")
            print(f"| {scenario} | {target} | {len(rows)} | {fmt(r.get('sent'))} | - "
                  f"| {fmt(r.get('resumes_per_server_cpu_s'))} resumes | - | {fmt(r.get('p50_us'))} "
                  f"| {fmt(r.get('p99_us'))} | {fmt(r.get('p999_us'))} | - | - "
                  f"| {fmt(r.get('missing'))} | {fmt((rss or 0) / 1024, 1)} | {r.get('errors')} | {notes} |")
            continue
        notes = [f"inflight {r.get('inflight')}"]
        if r.get("rate_offered"):
            notes.append(f"offered {fmt(r['rate_offered'])}/s")
        if r.get("segs_per_delivery") is not None:
            notes.append(f"{r['segs_per_delivery']:.2f} segs/delivery")
        if r.get("client_cpu_s") is not None and r.get("duration"):
            notes.append(f"client CPU {100 * r['client_cpu_s'] / r['duration']:.0f}%")
        if scenario == "slow":
            notes.append(f"slow p99 {fmt(r.get('slow_p99_us'))} µs, slow ended {r.get('slow_ended')}, "
                         f"markers {r.get('dropped_markers')}")
        if r.get("violations"):
            notes.append(f"{r['violations']} count violations")
        if scenario == "ingest":
            notes.append("accepted events")
        if scenario == "sentry_native":
            notes.append("the sentry scenario's events as plain JSON to /api/v1/events")
        if scenario == "sentry":
            notes.append("envelopes answered 200, gzip, ~4 KB event each")
            native = cells.get(("sentry_native", target))
            if target == "mesher" and native:
                native_rate = median_row(native).get("deliveries_per_server_cpu_s") or 0
                mine = r.get("deliveries_per_server_cpu_s") or 0
                if native_rate:
                    notes.append(f"{mine / native_rate:.2f}x of the native endpoint per server CPU-s")
            if r.get("settle_s") is not None:
                busy = f"server busy {r['settle_s']:.1f} s after the last reply (counted)"
                if r.get("settled") is False:
                    busy += ", still busy when measuring stopped"
                notes.append(busy)
        print(f"| {scenario} | {target} | {len(rows)} | {fmt(r.get('sent'))} | {fmt(r.get('deliveries_per_s'))} "
              f"| {fmt(r.get('deliveries_per_server_cpu_s'))} | {ratio} | {fmt(r.get('p50_us'))} "
              f"| {fmt(r.get('p99_us'))} | {fmt(r.get('p999_us'))} | {fmt(r.get('dropped'))} | {fmt(r.get('wrong'))} "
              f"| {fmt(r.get('missing'))} | {fmt((rss or 0) / 1024, 1)} | {r.get('errors')} | {', '.join(notes)} |")

# The harness must keep proving Mesher's counts: any error, wrong delivery, missing delivery or
# count violation in a Mesher run, or a scenario with no Mesher result, fails the run.
failures = []
for scenario in scenarios:
    if "mesher" in targets and (scenario, "mesher") not in cells:
        failures.append(f"{scenario}: no mesher result")
    for r in cells.get((scenario, "mesher"), []):
        bad = {k: r.get(k) for k in ("errors", "wrong", "violations", "missing") if r.get(k)}
        if bad:
            failures.append(f"{scenario}/mesher: {bad}")
for failure in failures:
    print(f"bench: FAILED {failure}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY
