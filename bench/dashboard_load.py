"""Study-page load time in headless Chromium for a study of 500 trials (target: under 2 s).

A benchmark, not a test. It fills a fresh SQLite store with ONE STUDY OF 500 SYNTHETIC TRIAL ROWS through
the Store API (`create_study`, `ensure_search`, `start_trial`, `finish_trial`, `update_study`), exactly as
the study driver writes real ones: 10 search units x 50 trials, each with params, status, objectives, final
metrics, an unlearning curve of ~10 evaluations, timings, tokens and environment. The numbers come from a
simple formula shaped like the micro testbed's real trials (the forget gap climbs from -0.27 at a rate set
by lr x steps; GA's utility collapses quickly, GA+GD on in-distribution data much less; random labels
plateau below the target; large GA steps diverge), NOT from training. Nothing else is synthetic: the store,
the Dash app and the browser are the real ones.

Timed: from navigation to the moment every figure of the study page has drawn its SVG and the trial
table is there, in a new browser context (empty browser cache) each time. The app is served from a process
of its own, as `tuner dashboard` serves it (a server inside this process would share its interpreter lock
with the Playwright driver, which `tuner dashboard` never does).
  cold: the server's study cache emptied first (store read, figures, guideline checks)
  warm: the server answers from its cache
Also timed: the server-side steps alone, and `tuner dashboard export` of the same study.

    python bench/dashboard_load.py                  # 500 trials, 5 repeats each
    python bench/dashboard_load.py --trials 2000 --repeats 3
Needs /usr/bin/chromium (scripts/install-chromium.sh).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dashboards.headless import CHROMIUM_ARGS
from tuner.core.hparams import EPOCHS, LR, RETAIN_WEIGHT
from tuner.store import Store

FIGURE_IDS = ("fig-pareto", "fig-robustness", "fig-attacks", "fig-curves", "fig-hypervolume", "fig-parallel",
              "fig-efficiency")
UNITS = [("ga", None), ("random_label", None), ("random_model_label", None), ("adversarial", None),
         ("retain_finetune", "in_distribution"), ("retain_finetune", "general"), ("ga_gd", "in_distribution"),
         ("ga_gd", "general"), ("ga_kl", "in_distribution"), ("ga_kl", "general")]
# The micro testbed's original model, as stored by real studies.
BASE = {"forget_nll": 4.743, "unseen_nll": 5.009, "retain_nll": 5.129, "general_nll": 5.209, "forget_gap": -0.266,
        "mia_auc": 0.814}
EXACT = {"forget_nll": 5.199, "unseen_nll": 5.099, "retain_nll": 5.182, "general_nll": 5.162, "forget_gap": 0.100,
         "mia_auc": 0.425}
STEPS_PER_EPOCH, EVAL_EVERY, BLOCK, BATCH = 32, 4, 64, 8


def synthetic_trial(method: str, source: str | None, lr: float, epochs: int, lam: float | None,
                    rng: random.Random) -> tuple[str, dict | None, dict]:
    """(status, objectives, payload) of one made-up trial, shaped like the testbed's real ones."""
    planned = epochs * STEPS_PER_EPOCH
    speed = {"ga": 27.0, "random_label": 14.0, "random_model_label": 15.0, "adversarial": 2.0,
             "retain_finetune": 0.6, "ga_gd": 22.0, "ga_kl": 24.0}[method]
    if lam is not None:
        speed /= 1 + 0.15 * lam
    speed *= math.exp(rng.gauss(0, 0.1))
    plateau = {"random_label": -0.06, "random_model_label": -0.03, "adversarial": -0.2,
               "retain_finetune": -0.12}.get(method)
    damage = {"ga": 3.0, "random_label": 1.5, "random_model_label": 1.4, "adversarial": 0.3,
              "retain_finetune": -0.4, "ga_gd": 0.3, "ga_kl": 0.45}[method]
    if lam is not None:
        damage /= 1 + (lam if source == "in_distribution" else 0.3 * lam)
    curve, stop, diverged = [], None, None
    for step in range(0, planned + 1, EVAL_EVERY):
        dose = lr * step
        if plateau is None:
            gap = BASE["forget_gap"] + speed * dose
        else:
            gap = BASE["forget_gap"] + (plateau - BASE["forget_gap"]) * (1 - math.exp(-speed * dose / 0.3))
        gap += rng.gauss(0, 0.004)
        drop = damage * (dose / 0.01) ** 2 if method == "ga" else damage * dose / 0.01
        if method == "ga" and step >= 4 and rng.random() < (lr - 8e-4) / 2e-3:  # large GA steps blow up
            diverged = step
            break
        unseen = BASE["unseen_nll"] + max(0.0, drop) * 0.9
        curve.append({"step": step, "loss": -BASE["forget_nll"] - gap if method.startswith("ga") else 5.0 - dose,
                      "forget_nll": unseen + gap, "unseen_nll": unseen, "retain_nll": BASE["retain_nll"] + drop,
                      "general_nll": BASE["general_nll"] + 0.95 * drop, "forget_gap": gap})
        if step > 0 and gap >= 0:
            stop = step
            break
    steps_done = diverged if diverged is not None else (stop if stop is not None else curve[-1]["step"])
    evals = len(curve)
    env = {"device": "cpu", "device_name": "cpu", "world_size": 1, "batch_size": BATCH, "grad_accum": 1,
           "effective_batch": BATCH, "dtype": "float32", "threads": 1}
    payload = {"planned_steps": planned, "steps_done": steps_done, "stop_step": stop, "diverged_step": diverged,
               "train_tokens": steps_done * BATCH * BLOCK, "eval_tokens": evals * 16_960,
               "train_time_s": steps_done * 0.024, "eval_time_s": evals * 0.19, "environment": env, "curve": curve}
    payload["wall_time_s"] = payload["train_time_s"] + payload["eval_time_s"] + 0.3
    if diverged is not None:
        payload.update(selected_step=curve[-1]["step"] if curve else 0,
                       reason=f"non-finite loss at step {diverged} (synthetic)")
        return "diverged", None, payload
    best = min(curve, key=lambda p: abs(p["forget_gap"]))
    payload["selected_step"] = best["step"]
    m = {k: best[k] for k in ("forget_nll", "unseen_nll", "retain_nll", "general_nll", "forget_gap")}
    m["utility_drop"] = m["retain_nll"] - BASE["retain_nll"]
    m["general_utility_drop"] = m["general_nll"] - BASE["general_nll"]
    m["mia_auc"] = m["mia_auc_mink"] = min(0.99, max(0.05, 0.5 - 1.18 * m["forget_gap"] + rng.gauss(0, 0.02)))
    m["mia_auc_loss"] = m["mia_auc"] - 0.05
    m["mia_auc_zlib"] = 0.5 + (m["mia_auc"] - 0.5) * 0.6
    for k in ("forget", "unseen", "retain", "general"):
        m[f"{k}_ppl"] = math.exp(m[f"{k}_nll"])
    payload["metrics"] = m
    status = "stopped_at_target" if stop is not None else "completed"
    return status, {"forget_gap": abs(m["forget_gap"]), "utility_drop": m["utility_drop"]}, payload


def fill_store(url: str, name: str, trials: int, seed: int = 0) -> Store:
    store = Store(url)
    rng = random.Random(seed)
    spec = {"name": name, "model": "testbed:micro", "notes": "SYNTHETIC trial rows written by bench/dashboard_load.py",
            "objectives": ["forget_gap", "utility_drop"], "sampler": {"name": "tpe"},
            "budget": {"trials": math.ceil(trials / len(UNITS))},
            "search": {LR.name: {"low": 1e-4, "high": 3e-3, "log": True}, EPOCHS.name: {"low": 1, "high": 4},
                       RETAIN_WEIGHT.name: {"low": 0.3, "high": 3.0, "log": True}},
            "target": {"gap_tolerance": 0.05, "utility_tolerance": 0.3, "mia_tolerance": 0.1}}
    study_id = store.create_study(name, "testbed:micro", seed, spec, "# synthetic\n", {"bench": "dashboard_load"})
    per_unit = [trials // len(UNITS) + (i < trials % len(UNITS)) for i in range(len(UNITS))]
    for (method, source), n in zip(UNITS, per_unit, strict=True):
        unit = method if source is None else f"{method}@{source}"
        search_id = store.ensure_search(study_id, unit, method, source, f"{name}/{unit}", "tpe", n, spec["search"])
        for _ in range(n):
            lr = math.exp(rng.uniform(math.log(1e-4), math.log(3e-3)))
            epochs = rng.randint(1, 4)
            lam = math.exp(rng.uniform(math.log(0.3), math.log(3.0))) if method in ("ga_gd", "ga_kl") else None
            params = {LR.name: lr, EPOCHS.name: epochs} | ({RETAIN_WEIGHT.name: lam} if lam is not None else {})
            row = store.start_trial(search_id, params, host="synthetic")
            if rng.random() < 0.01:  # a worker dies now and then
                store.finish_trial(row, "failed", None, None, error="RuntimeError: worker lost (synthetic)")
                continue
            status, objectives, payload = synthetic_trial(method, source, lr, epochs, lam, rng)
            store.finish_trial(row, status, objectives, payload)
    blocks = {"forget": 254, "unseen": 256, "retain_in_distribution_train": 703, "retain_general_train": 786,
              "retain_in_distribution_eval": 176, "retain_general_eval": 197}
    store.update_study(study_id, status="finished", baseline=BASE, exact_retrain=EXACT,
                       data_summary={"blocks": blocks, "sources": {}})
    from tuner.results import derived

    derived.refresh(store, name)  # the Pareto flags and the recommendation, as the study driver stores them
    return store


# Milestones of a typed-URL load, in ms since navigation (from the browser's own performance entries; the
# app marks "plotly-ready" when plotly.js has run): where the time of a cold load goes.
PHASES_JS = """() => {
  const res = performance.getEntriesByType('resource');
  const end = part => Math.max(0, ...res.filter(e => e.name.includes(part)).map(e => e.responseEnd));
  const mark = performance.getEntriesByName('plotly-ready')[0];
  return {'Dash bundles received': Math.max(0, ...res.filter(e => e.name.includes('/_dash-component-suites/dash/')
                                                   && !e.name.includes('/async-')).map(e => e.responseEnd)),
          'plotly.js received': Math.max(end('/_tuner/plotly'), end('plotly.min.js')),
          'plotly.js run': mark ? mark.startTime : null,
          'study page from server': end('/_dash-update-component'),
          'every figure drawn': performance.now()};
}"""


def time_page(browser, url: str, via_list: bool = False, slowdown: float = 1.0) -> tuple[float, list[str],
                                                                                  dict[str, float]]:
    """Seconds from navigation (or, `via_list`, from clicking the study in the list page, the app already
    loaded) until every figure has drawn its SVG and the trial table shows rows; and, for a typed URL, the
    milestones of PHASES_JS. `slowdown` > 1 runs the page's CPU that many times slower (Chromium's own
    DevTools throttling of the renderer): how much room the load leaves for a slower machine."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    if slowdown > 1:
        context.new_cdp_session(page).send("Emulation.setCPUThrottlingRate", {"rate": slowdown})
    problems = watch_errors(page)
    if via_list:
        base, name = url.split("/study/")
        page.goto(base + "/")
        link = page.wait_for_selector(f"#study-table a[href='/study/{name}']", timeout=60_000)
        page.wait_for_function("() => window.Plotly && window.Plotly.newPlot", timeout=60_000)
        start = time.perf_counter()
        link.click()
    else:
        start = time.perf_counter()
        page.goto(url)
    wait_rendered(page)
    elapsed = time.perf_counter() - start
    phases = {} if via_list else page.evaluate(PHASES_JS)
    context.close()
    return elapsed, problems, phases


def watch_errors(page) -> list[str]:
    """The console errors and uncaught exceptions of `page`, collected as they happen."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


RENDERED_JS = """(ids) => ids.every(id => document.querySelector('#' + id + ' .js-plotly-plot .main-svg'))
                   && document.querySelector('#trial-table td') !== null"""


def wait_rendered(page) -> None:
    """Every figure drawn and the trial table filled: what 'the page loaded' means here. One check, run by
    the page at each animation frame, so the time is not padded by one driver round trip per figure (Plotly
    draws a figure in the task that creates its SVG, so the SVG is there only when the figure is drawn)."""
    page.wait_for_function(RENDERED_JS, arg=list(FIGURE_IDS), polling="raf", timeout=60_000)


def time_revisit(browser, url: str, server: AppServer) -> tuple[float, list[str]]:
    """A returning user: the browser opened the page twice before; the server cache is emptied first."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    for _ in range(2):
        warm = context.new_page()
        warm.goto(url)
        warm.wait_for_selector("#fig-pareto .js-plotly-plot .main-svg", timeout=60_000)
        warm.close()
    server.clear_cache()
    page = context.new_page()
    problems = watch_errors(page)
    start = time.perf_counter()
    page.goto(url)
    wait_rendered(page)
    elapsed = time.perf_counter() - start
    context.close()
    return elapsed, problems


class AppServer:
    """The Dash app of `dashboards.app.create_app` in a process of its own (this file with `--serve`), plus
    one benchmark-only route that empties its study cache, so a cold load needs no restart."""

    def __init__(self, store_url: str, server: str = "waitress") -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", store_url, "--port", str(self.port),
                                      "--server", server], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/api/studies", timeout=5).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's dashboard server did not start") from None
                time.sleep(0.2)

    def clear_cache(self) -> None:
        urllib.request.urlopen(self.url + "/_bench/clear-cache", timeout=30).read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def serve(store_url: str, port: int, server: str) -> None:
    """The `--serve` side of AppServer: the app as `tuner dashboard` runs it (or on Flask's development
    server, for comparison), plus the cache-clearing route."""
    from dashboards import server as production
    from dashboards.app import create_app

    app = create_app(store_url)
    cache = app.server.extensions["tuner_dashboards"]

    def clear() -> str:
        with cache.lock:
            cache.items.clear()
        return "cleared"

    app.server.add_url_rule("/_bench/clear-cache", "bench_clear_cache", clear)
    if server == "flask":
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request lines
        app.run(host="127.0.0.1", port=port, debug=False)
    else:
        production.serve(app, "127.0.0.1", port)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--limit", type=float, default=2.0, help="seconds the study page must load within")
    ap.add_argument("--slowdown", type=float, default=1.5,
                    help="also time typed-URL loads with the browser's CPU throttled this many times (Chromium "
                         "DevTools emulation), to show the room left for a slower machine; 1 skips it")
    ap.add_argument("--server", choices=("waitress", "flask"), default="waitress",
                    help="serve the app as `tuner dashboard` does (waitress), or with Flask's development server "
                         "for comparison")
    ap.add_argument("--serve", metavar="STORE_URL", help=argparse.SUPPRESS)  # the app's own process
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.server)
        return 0
    if not Path(args.chromium).exists():
        print(f"{args.chromium} not found: run scripts/install-chromium.sh", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from dashboards import data as D
    from dashboards import figures as F
    from dashboards import guidelines as G
    from dashboards.report import export

    print(f"NOTE: the {args.trials} trial rows below are SYNTHETIC (made up by a formula shaped like real testbed "
          "trials, written through the Store API); the store, app and browser are real.")
    with tempfile.TemporaryDirectory(prefix="dash-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        t0 = time.perf_counter()
        store = fill_store(url, "bench500", args.trials)
        fill_s = time.perf_counter() - t0
        rows = store.trials("bench500")
        points = sum(len(store.curve(r["id"])) for r in rows[:50]) / 50
        statuses = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
        print(f"store: {len(rows)} synthetic trials in 10 units ({statuses}), ~{points:.0f} curve points each; "
              f"filled in {fill_s:.1f} s")

        server_times = {"load_study": [], "figures": [], "guidelines": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            data = D.load_study(store, "bench500")
            server_times["load_study"].append(time.perf_counter() - t)
            t = time.perf_counter()
            F.all_figures(data)
            server_times["figures"].append(time.perf_counter() - t)
            t = time.perf_counter()
            G.check_all(data)
            server_times["guidelines"].append(time.perf_counter() - t)
        print(f"server side (median of {args.repeats}): "
              + ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in server_times.items()))

        times: dict[str, list[float]] = {"direct-cold": [], "direct-warm": [], "list-cold": [], "list-warm": [],
                                         "revisit-cold": [], "direct-slow": []}
        problems: list[str] = []
        phases: dict[str, list[float]] = {}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            srv = AppServer(url, args.server)
            time_page(browser, srv.url + "/study/bench500")  # unmeasured: OS file cache, browser start-up
            for _ in range(args.repeats):
                for via in ("direct", "list"):
                    srv.clear_cache()
                    for server_state in ("cold", "warm"):
                        elapsed, errs, marks = time_page(browser, srv.url + "/study/bench500",
                                                         via_list=via == "list")
                        times[f"{via}-{server_state}"].append(elapsed)
                        problems += errs
                        if via == "direct" and server_state == "cold":
                            for k, v in marks.items():
                                phases.setdefault(k, []).append(v)
                elapsed, errs = time_revisit(browser, srv.url + "/study/bench500", srv)
                times["revisit-cold"].append(elapsed)
                problems += errs
                if args.slowdown > 1:
                    srv.clear_cache()
                    elapsed, errs, _ = time_page(browser, srv.url + "/study/bench500", slowdown=args.slowdown)
                    times["direct-slow"].append(elapsed)
                    problems += errs
            srv.stop()
            out = Path(tmp) / "report.html"
            t = time.perf_counter()
            export(store, "bench500", out)
            export_s = time.perf_counter() - t
            context = browser.new_context()
            context.set_offline(True)
            page = context.new_page()
            t = time.perf_counter()
            page.goto(out.as_uri())
            for sid in FIGURE_IDS:
                page.wait_for_selector(f"#{sid} .js-plotly-plot .main-svg", timeout=60_000)
            report_s = time.perf_counter() - t
            context.close()
            browser.close()
            version = p.chromium.name

    def line(name: str, values: list[float]) -> str:
        return (f"{name}: median {statistics.median(values):.2f} s, min {min(values):.2f} s, max {max(values):.2f} s "
                f"over {len(values)} loads")

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, browser "
          f"{version} {args.chromium}; server {args.server}; load average during the run {load} (other processes "
          "slow every number)")
    print("study page, until every figure has drawn and the trial table shows rows (new browser context each time):")
    print("  " + line("opened from the study list (app loaded), cold server (store read, figures, checks)",
                      times["list-cold"]))
    print("  " + line("opened from the study list, warm server (study cached)", times["list-warm"]))
    print("  " + line("typed URL, nothing loaded yet (Dash and plotly.js bundles parsed first), cold server",
                      times["direct-cold"]))
    print("  " + line("typed URL, warm server", times["direct-warm"]))
    print("  " + line("typed URL again in a browser that opened it before (HTTP and code caches), cold server",
                      times["revisit-cold"]))
    if times["direct-slow"]:
        print("  " + line(f"typed URL, cold server, browser CPU throttled {args.slowdown:g}x (a slower machine's "
                          "browser; not part of PASS/FAIL)", times["direct-slow"]))
    print("typed URL, cold server, medians in ms since navigation: " + ", ".join(
        f"{k} {statistics.median(v):.0f}" for k, v in phases.items() if None not in v))
    print(f"export: {export_s:.2f} s to write {out.name} ({args.trials} trials); offline open to every figure drawn: "
          f"{report_s:.2f} s")
    if problems:
        print(f"console errors: {problems[:5]}")
    ok = not problems
    for key, what in (("list-cold", "opened from the study list"), ("direct-cold", "typed URL, fresh browser")):
        median = statistics.median(times[key])
        ok = ok and median < args.limit
        print(f"{'PASS' if median < args.limit else 'FAIL'}: study page, {what}, cold server: median "
              f"{median:.2f} s {'<' if median < args.limit else '>='} {args.limit:.1f} s for {args.trials} "
              "SYNTHETIC trials")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
