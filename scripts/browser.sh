#!/usr/bin/env bash
# Sourced by scripts/test.sh: the live page's tests drive Debian's Chromium through its
# chromedriver; install both when missing.
if ! command -v chromedriver >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then
    echo "installing chromium and chromium-driver for the live page's tests"
    sudo_if_needed=""
    [ "$(id -u)" != 0 ] && sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -q chromium chromium-driver >/dev/null
fi
export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
