#!/usr/bin/env bash
# Make sure Debian's chromium is installed at /usr/bin/chromium for the headless-browser
# report test (tests/test_report_browser.py). Idempotent: does nothing when it is present.
# Playwright drives this system browser; no browser is downloaded by playwright itself.
set -euo pipefail

CHROMIUM="${QVLM_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
    echo "chromium present: $("$CHROMIUM" --version 2>/dev/null)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $CHROMIUM is missing and apt-get is unavailable; install Chromium and set QVLM_CHROMIUM" >&2
    exit 2
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: installing chromium needs root (or sudo)" >&2; exit 2; }
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
"$CHROMIUM" --version
