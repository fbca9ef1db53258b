#!/usr/bin/env bash
# Provides a PostgreSQL server for the tests and exports DATABASE_URL.
#
#   source scripts/test-postgres.sh       exports DATABASE_URL in this shell; a throwaway
#                                         cluster is stopped when the shell exits
#   scripts/test-postgres.sh CMD [ARG]... runs CMD with DATABASE_URL set, then cleans up and
#                                         exits with CMD's status
#   scripts/test-postgres.sh              checks that a server can be had and prints its URL
#
# Order: DATABASE_URL if it answers; else a server on 127.0.0.1:5432 (database `test`, created
# if missing); else a throwaway cluster from the installed PostgreSQL binaries (installed with
# apt-get when missing and root), on a free port in a temporary directory, trust auth, run as
# the `postgres` OS user when we are root (PostgreSQL refuses to run as root).
#
# Environment:
#   MESHER_TEST_PG_FORCE_THROWAWAY=1  skip DATABASE_URL and port 5432; always start a cluster
#   MESHER_TEST_PG_SHARED_PORT        port probed for a running server (default 5432)
#   MESHER_TEST_PG_TMP                parent of the throwaway cluster's directory (default /tmp,
#                                     which the postgres user can reach)

# Seconds pg_ctl waits for the throwaway server to accept connections.
MESHER_TEST_PG_START_TIMEOUT_S=60
# Ports tried for the throwaway server, starting at a per-process offset above this base.
MESHER_TEST_PG_PORT_BASE=55432
MESHER_TEST_PG_PORT_TRIES=200

mesher_test_pg_log() {
    echo "test-postgres: $*" >&2
}

# Runs a command as the postgres OS user when we are root, else as ourselves.
mesher_test_pg_as_owner() {
    if [ "$(id -u)" != 0 ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- "$@"
    else
        su -s /bin/bash postgres -c "$(printf '%q ' "$@")"
    fi
}

mesher_test_pg_bin_dir() {
    local dir
    dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

mesher_test_pg_psql() {
    local bin_dir
    if command -v psql >/dev/null 2>&1; then
        psql "$@"
    elif bin_dir=$(mesher_test_pg_bin_dir); then
        "$bin_dir/psql" "$@"
    else
        return 127
    fi
}

# True when the URL accepts a connection and answers a query.
mesher_test_pg_answers() {
    [ "$(mesher_test_pg_psql "$1" -X -Atqc 'select 1' 2>/dev/null)" = 1 ]
}

mesher_test_pg_install() {
    if mesher_test_pg_bin_dir >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        mesher_test_pg_log "no PostgreSQL binaries under /usr/lib/postgresql and cannot install them"
        return 1
    fi
    mesher_test_pg_log "installing PostgreSQL with apt-get"
    apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            postgresql >/dev/null || return 1
    mesher_test_pg_bin_dir >/dev/null
}

mesher_test_pg_port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

mesher_test_pg_stop() {
    local dir=${MESHER_TEST_PG_THROWAWAY_DIR:-}
    [ -n "$dir" ] || return 0
    unset MESHER_TEST_PG_THROWAWAY_DIR
    if [ -f "$dir/data/postmaster.pid" ]; then
        mesher_test_pg_as_owner "$MESHER_TEST_PG_BIN_DIR/pg_ctl" -D "$dir/data" -m immediate \
            -w stop >/dev/null 2>&1
    fi
    rm -rf "$dir"
    mesher_test_pg_log "stopped the throwaway cluster in $dir"
}

mesher_test_pg_start_throwaway() {
    mesher_test_pg_install || return 1
    local bin_dir dir port tries=0
    bin_dir=$(mesher_test_pg_bin_dir) || return 1
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /bin/bash postgres || return 1
    fi
    port=$((MESHER_TEST_PG_PORT_BASE + $$ % 1000))
    while ! mesher_test_pg_port_free "$port"; do
        tries=$((tries + 1))
        if [ "$tries" -ge "$MESHER_TEST_PG_PORT_TRIES" ]; then
            mesher_test_pg_log "no free port from $MESHER_TEST_PG_PORT_BASE on"
            return 1
        fi
        port=$((port + 1))
    done
    dir=$(mktemp -d "${MESHER_TEST_PG_TMP:-/tmp}/mesher-pg.XXXXXX") || return 1
    chmod 700 "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir" || return 1
    fi
    export MESHER_TEST_PG_THROWAWAY_DIR=$dir MESHER_TEST_PG_BIN_DIR=$bin_dir
    mesher_test_pg_log "starting a throwaway cluster ($bin_dir) on 127.0.0.1:$port in $dir"
    if ! mesher_test_pg_as_owner "$bin_dir/initdb" -D "$dir/data" -A trust -U postgres \
        -E UTF8 --no-sync >"$dir/initdb.log" 2>&1; then
        mesher_test_pg_log "initdb failed:"
        cat "$dir/initdb.log" >&2
        mesher_test_pg_stop
        return 1
    fi
    # Durability is pointless for a cluster deleted after the run. Another test may take the
    # port between the check above and the start: then the next free port is tried.
    local starts=0
    until mesher_test_pg_as_owner "$bin_dir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -t "$MESHER_TEST_PG_START_TIMEOUT_S" \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null; do
        starts=$((starts + 1))
        if [ "$starts" -ge 3 ]; then
            mesher_test_pg_log "the server did not start:"
            cat "$dir/server.log" >&2
            mesher_test_pg_stop
            return 1
        fi
        port=$((port + 1))
        while ! mesher_test_pg_port_free "$port"; do port=$((port + 1)); done
        mesher_test_pg_log "retrying on 127.0.0.1:$port"
    done
    if ! mesher_test_pg_psql "postgres://postgres@127.0.0.1:$port/postgres" -X -qc \
        'CREATE DATABASE test' >/dev/null; then
        mesher_test_pg_stop
        return 1
    fi
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/test"
}

# Stops the throwaway cluster when the sourcing shell exits, keeping any EXIT trap it had.
mesher_test_pg_register_cleanup() {
    local -a previous=()
    eval "previous=($(trap -p EXIT))"
    if [ "${#previous[@]}" -ge 3 ]; then
        # shellcheck disable=SC2064 # the earlier trap's text is meant to be expanded now
        trap "mesher_test_pg_stop; ${previous[2]}" EXIT
    else
        trap mesher_test_pg_stop EXIT
    fi
}

mesher_test_pg_main() {
    if [ "${MESHER_TEST_PG_FORCE_THROWAWAY:-0}" != 1 ]; then
        if [ -n "${DATABASE_URL:-}" ]; then
            if mesher_test_pg_answers "$DATABASE_URL"; then
                mesher_test_pg_log "using DATABASE_URL"
                return 0
            fi
            mesher_test_pg_log "DATABASE_URL does not answer; looking for another server"
        fi
        local port=${MESHER_TEST_PG_SHARED_PORT:-5432}
        local server="postgres://postgres@127.0.0.1:$port"
        if mesher_test_pg_answers "$server/postgres"; then
            if [ "$(mesher_test_pg_psql "$server/postgres" -X -Atqc \
                "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
                mesher_test_pg_psql "$server/postgres" -X -qc 'CREATE DATABASE test' >/dev/null
            fi
            if mesher_test_pg_answers "$server/test"; then
                export DATABASE_URL="$server/test"
                mesher_test_pg_log "using the server on 127.0.0.1:$port"
                return 0
            fi
        fi
    fi
    mesher_test_pg_start_throwaway
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    if mesher_test_pg_main; then
        if [ -n "${MESHER_TEST_PG_THROWAWAY_DIR:-}" ]; then
            mesher_test_pg_register_cleanup
        fi
    else
        mesher_test_pg_log "no PostgreSQL available"
        return 1
    fi
else
    if ! mesher_test_pg_main; then
        mesher_test_pg_log "no PostgreSQL available"
        exit 1
    fi
    trap mesher_test_pg_stop EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if [ "$#" -eq 0 ]; then
        echo "DATABASE_URL=$DATABASE_URL"
        exit 0
    fi
    "$@"
    exit $?
fi
