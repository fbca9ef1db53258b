#!/usr/bin/env bash
# Installs, when missing, the real Sentry SDKs that the black-box tests of the Sentry endpoints
# drive (tests/sentry_sdks.rs), under the build directory, and exports where they are.
#
#   source scripts/sdks.sh    installs what is missing and exports the paths below
#   scripts/sdks.sh           the same, then prints the paths
#
# What it installs (versions pinned, so a test run sends what the tests were written against):
#   target/sdks/python-brotli/  a virtualenv with sentry-sdk and brotli: the SDK sends `br` bodies
#   target/sdks/python-gzip/    a virtualenv with sentry-sdk alone: the SDK sends `gzip` bodies
#   target/sdks/node/           @sentry/node in a folder of its own (npm)
#
# Exports:
#   MESHER_TEST_SENTRY_PYTHON_BROTLI   the python of target/sdks/python-brotli
#   MESHER_TEST_SENTRY_PYTHON_GZIP     the python of target/sdks/python-gzip
#   MESHER_TEST_SENTRY_NODE_MODULES    target/sdks/node/node_modules (for NODE_PATH)
#
# Needs python3 (with venv) and node with npm; installs them with apt-get when missing and root.

MESHER_SENTRY_PYTHON_SDK_VERSION=2.76.0
MESHER_SENTRY_BROTLI_VERSION=1.2.1
MESHER_SENTRY_NODE_SDK_VERSION=11.12.0

mesher_sdks_log() {
    echo "sdks: $*" >&2
}

# Installs Debian packages when a command is missing and we may.
mesher_sdks_need() {
    local command=$1
    shift
    if command -v "$command" >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        mesher_sdks_log "installing $* for $command"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
    command -v "$command" >/dev/null 2>&1 || {
        mesher_sdks_log "$command is missing; install $* to run the Sentry SDK tests"
        return 1
    }
}

# A virtualenv at $1 holding the pinned sentry-sdk and, with $2 = brotli, the brotli package.
mesher_sdks_python() {
    local venv=$1 with=$2
    local want="sentry_sdk.VERSION == '${MESHER_SENTRY_PYTHON_SDK_VERSION}'"
    if [ "$with" = brotli ]; then
        want="$want and __import__('brotli') is not None"
    else
        want="$want and __import__('importlib').util.find_spec('brotli') is None"
    fi
    if "$venv/bin/python" -c "import sentry_sdk, sys; sys.exit(0 if $want else 1)" 2>/dev/null; then
        return 0
    fi
    mesher_sdks_log "installing sentry-sdk ${MESHER_SENTRY_PYTHON_SDK_VERSION} ($with) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
    local packages=("sentry-sdk==${MESHER_SENTRY_PYTHON_SDK_VERSION}")
    if [ "$with" = brotli ]; then
        packages+=("brotli==${MESHER_SENTRY_BROTLI_VERSION}")
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${packages[@]}" || return 1
}

# @sentry/node pinned, in its own folder.
mesher_sdks_node() {
    local folder=$1
    local installed="$folder/node_modules/@sentry/node/package.json"
    if [ -f "$installed" ] && grep -q "\"version\": \"${MESHER_SENTRY_NODE_SDK_VERSION}\"" "$installed"; then
        return 0
    fi
    mesher_sdks_log "installing @sentry/node ${MESHER_SENTRY_NODE_SDK_VERSION} into $folder"
    mkdir -p "$folder"
    [ -f "$folder/package.json" ] || echo '{"name":"mesher-test-sdks","private":true}' >"$folder/package.json"
    (cd "$folder" && npm install --no-audit --no-fund --silent \
        "@sentry/node@${MESHER_SENTRY_NODE_SDK_VERSION}") || return 1
}

mesher_sdks_install() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local dir="${CARGO_TARGET_DIR:-$root/target}/sdks"
    mkdir -p "$dir"
    mesher_sdks_need python3 python3 python3-venv || return 1
    python3 -c "import venv, ensurepip" 2>/dev/null || mesher_sdks_need_venv || return 1
    mesher_sdks_need node nodejs || return 1
    mesher_sdks_need npm npm || return 1
    mesher_sdks_python "$dir/python-brotli" brotli || return 1
    mesher_sdks_python "$dir/python-gzip" none || return 1
    mesher_sdks_node "$dir/node" || return 1
    export MESHER_TEST_SENTRY_PYTHON_BROTLI="$dir/python-brotli/bin/python"
    export MESHER_TEST_SENTRY_PYTHON_GZIP="$dir/python-gzip/bin/python"
    export MESHER_TEST_SENTRY_NODE_MODULES="$dir/node/node_modules"
}

# python3 without its venv module (Debian splits it out).
mesher_sdks_need_venv() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        mesher_sdks_log "installing python3-venv"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -c "import venv, ensurepip" 2>/dev/null
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    mesher_sdks_install
    echo "MESHER_TEST_SENTRY_PYTHON_BROTLI=$MESHER_TEST_SENTRY_PYTHON_BROTLI"
    echo "MESHER_TEST_SENTRY_PYTHON_GZIP=$MESHER_TEST_SENTRY_PYTHON_GZIP"
    echo "MESHER_TEST_SENTRY_NODE_MODULES=$MESHER_TEST_SENTRY_NODE_MODULES"
else
    mesher_sdks_install || {
        mesher_sdks_log "the Sentry SDKs could not be installed; tests/sentry_sdks.rs will fail"
        return 1
    }
fi
