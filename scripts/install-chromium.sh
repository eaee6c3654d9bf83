#!/usr/bin/env bash
# Headless Chromium for the dashboard browser tests (tests/test_dashboards.py) and bench/dashboard_load.py.
# Playwright's own browser download does not work on our machines; the tests drive the distribution's
# /usr/bin/chromium instead. Idempotent and quiet: does nothing when Chromium is already there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
/usr/bin/chromium --version 2>/dev/null || true
