#!/usr/bin/env bash
# Provides a NATS server for the tests of several nodes and exports MESHER_TEST_NATS_URL.
#
#   source scripts/test-nats.sh    exports MESHER_TEST_NATS_URL in this shell; a throwaway
#                                  server is stopped when the shell exits
#
# Order: MESHER_TEST_NATS_URL if set; else a server on 127.0.0.1:4222; else a throwaway
# `nats-server` (Debian package `nats-server`, installed with apt-get when missing and root)
# on a free port. The tests that stop NATS start their own `nats-server` (MESHER_TEST_NATS_SERVER
# names the binary).

mesher_test_nats_log() {
    echo "test-nats: $*" >&2
}

# Whether something accepts TCP connections on 127.0.0.1:$1.
mesher_test_nats_answers() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

mesher_test_nats_binary() {
    if command -v nats-server >/dev/null 2>&1; then
        command -v nats-server
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        mesher_test_nats_log "installing nats-server"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nats-server >/dev/null 2>&1; }
    fi
    command -v nats-server
}

MESHER_TEST_NATS_SERVER="$(mesher_test_nats_binary || true)"
export MESHER_TEST_NATS_SERVER
if [ -z "${MESHER_TEST_NATS_URL:-}" ]; then
    if mesher_test_nats_answers 4222; then
        export MESHER_TEST_NATS_URL="nats://127.0.0.1:4222"
    elif [ -n "$MESHER_TEST_NATS_SERVER" ]; then
        for port in $(seq $((14222 + $$ % 500)) $((14222 + $$ % 500 + 50))); do
            if ! mesher_test_nats_answers "$port"; then
                "$MESHER_TEST_NATS_SERVER" -a 127.0.0.1 -p "$port" >/dev/null 2>&1 &
                MESHER_TEST_NATS_PID=$!
                # Stopped when the sourcing shell exits, keeping any EXIT trap it had.
                mesher_test_nats_previous=()
                eval "mesher_test_nats_previous=($(trap -p EXIT))"
                if [ "${#mesher_test_nats_previous[@]}" -ge 3 ]; then
                    # shellcheck disable=SC2064 # the earlier trap's text is meant to be expanded now
                    trap "kill $MESHER_TEST_NATS_PID 2>/dev/null || true; ${mesher_test_nats_previous[2]}" EXIT
                else
                    # shellcheck disable=SC2064
                    trap "kill $MESHER_TEST_NATS_PID 2>/dev/null || true" EXIT
                fi
                for _ in $(seq 50); do
                    mesher_test_nats_answers "$port" && break
                    sleep 0.1
                done
                export MESHER_TEST_NATS_URL="nats://127.0.0.1:$port"
                break
            fi
        done
    fi
fi
if [ -n "${MESHER_TEST_NATS_URL:-}" ]; then
    mesher_test_nats_log "tests use NATS at ${MESHER_TEST_NATS_URL}"
else
    mesher_test_nats_log "no NATS server could be had: the tests of several nodes will fail"
fi
