"""PNG screenshots of the dashboards for the docs: the study list and one study page, in headless Chromium.

    python -m dashboards.screenshots --storage sqlite:////tmp/dash.db --study demo --out docs/

Writes `dashboard-list.png` and `dashboard-study.png` (the whole page). Needs /usr/bin/chromium
(scripts/install-chromium.sh) and Playwright for Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import quote

from dashboards.headless import CHROMIUM_ARGS
from dashboards.server import BackgroundServer

FIGURE_IDS = ("fig-pareto", "fig-robustness", "fig-attacks", "fig-curves", "fig-calibration", "fig-hypervolume",
              "fig-parallel", "fig-efficiency")


def take(storage: str, study: str, out: Path, chromium: str = "/usr/bin/chromium", width: int = 1400) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from dashboards.app import create_app

    server = BackgroundServer(create_app(storage))
    base = server.url
    written = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": 800})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(base + "/")
            page.wait_for_selector("#study-table", timeout=30_000)
            page.screenshot(path=str(out / "dashboard-list.png"), full_page=True)
            written.append(out / "dashboard-list.png")
            page.goto(base + "/study/" + quote(study, safe=""))
            for sid in FIGURE_IDS:
                page.wait_for_selector(f"#{sid} .js-plotly-plot .main-svg", timeout=30_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "dashboard-study.png"), full_page=True)
            written.append(out / "dashboard-study.png")
            browser.close()
            if errors:
                raise RuntimeError(f"console errors while taking screenshots: {errors[:3]}")
    finally:
        server.stop()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="SQLAlchemy URL of the store")
    ap.add_argument("--study", required=True, help="study whose page to capture")
    ap.add_argument("--out", default="docs", help="folder for the PNGs (default docs/)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in take(args.storage, args.study, out, args.chromium):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
