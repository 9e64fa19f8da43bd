#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the report's browser test (tests/unit/test_report_browser.py).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or sudo) and network for apt;
# when that is impossible it prints why and exits 0, and the browser test is skipped with that reason.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: no apt-get on this system; the browser test will be skipped" >&2
    exit 0
fi
SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure-chromium: not root and no passwordless sudo; the browser test will be skipped" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; }; then
    echo "ensure-chromium: apt-get install chromium failed; the browser test will be skipped" >&2
fi
