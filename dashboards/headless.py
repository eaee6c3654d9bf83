"""The flags for the system's headless Chromium, shared by the screenshots, the load benchmark and the
browser tests (the app's server for them is `dashboards.server.BackgroundServer`)."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
