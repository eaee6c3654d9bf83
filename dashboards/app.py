"""`tuner dashboard`: the Dash web app. A study list at `/`, a page per study at `/study/NAME`.

It only reads the store. A study page is built in one server round trip (every figure in the first
response), then, while the study is running, a `dcc.Interval` asks every few seconds whether the study
changed (a cheap fingerprint query) and redraws only if it did; zoom and legend choices survive redraws.
Dash renders every string as text, so stored names, notes and errors are escaped by construction.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from dashboards import api, figures, plotlyjs, queries, trialtable
from dashboards.data import StudyData, fmt, load_study, table_columns, table_rows
from dashboards.page import (
    FAILING_COLOUR,
    RECOMMENDATION_COLUMNS,
    SECTIONS,
    VERDICT_COLOURS,
    guideline_rows,
    header_facts,
    recommendation_rows,
)
from tuner.errors import TunerError
from tuner.hparams import EPOCHS, LR
from tuner.store import Store, safe_url

REFRESH_MS = 5000
LAZY_CHUNKS = ["dash/dcc/async-graph.js", "dash/dcc/async-dropdown.js"]
CSS = """
/* The dashboards' look: plain, readable, wide tables scroll instead of squeezing. */
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 0; color: #1f2328; background: #fff; }
.topbar { background: #24292f; color: #fff; padding: 10px 24px; display: flex; gap: 18px; align-items: baseline; }
.topbar a { color: #fff; text-decoration: none; font-weight: 600; }
.topbar .store { color: #afb8c1; font-size: 12px; }
.page { max-width: 1400px; margin: 0 auto; padding: 0 24px 48px; }
h1 { margin: 20px 0 4px; font-size: 26px; }
h2 { margin: 30px 0 6px; font-size: 19px; }
.lead, .notes { color: #57606a; margin: 4px 0 12px; white-space: pre-wrap; }
.live { color: #bf8700; font-weight: 600; }
table.simple { border-collapse: collapse; font-size: 13px; }
table.simple th, table.simple td { border-bottom: 1px solid #d8dee4; padding: 4px 8px; text-align: left;
  vertical-align: top; }
table.simple thead th { background: #f6f8fa; }
table.facts th { font-weight: 600; }
.verdict { font-weight: 700; white-space: nowrap; }
.wrap { overflow-x: auto; }
nav.sections a { margin-right: 14px; }
.controls { display: flex; gap: 24px; align-items: center; font-size: 13px; margin: 4px 0; }
.controls label { margin-right: 10px; }
.error { color: #cf222e; }
"""
INDEX = """<!DOCTYPE html>
<html lang="en">
    <head>
        {%metas%}
        <title>{%title%}</title>
        {%favicon%}
        {%css%}
        <style>{CSS}</style>
        <script>
        // Dash ships core-js 2 (for IE11), which replaces the browser's own trim and parseInt/parseFloat with
        // slower JavaScript in every current browser (its whitespace test predates Unicode 6.3); Plotly calls
        // them for every point and label it draws. Keep the browser's own and put them back after Dash's
        // scripts (see NATIVE_RESTORE below).
        window.__tunerNative = {trim: String.prototype.trim, trimStart: String.prototype.trimStart,
          trimEnd: String.prototype.trimEnd, parseInt: window.parseInt, parseFloat: window.parseFloat};
        </script>
        <script>
        // Start fetching and compiling plotly.js now, in parallel with the Dash bundles and the first server
        // round trip, instead of when the first graph mounts. dcc.Graph takes `window.Plotly` when it is set
        // (a promise is adopted); the bundle replaces it with the real object when it has run. The lazy
        // chunks of the graph, dropdown and table components are fetched the same way (webpack registers a
        // chunk that is already there instead of fetching it again).
        (function () {
          function load(src) {
            var s = document.createElement("script");
            s.src = src;
            s.async = true;
            document.head.appendChild(s);
            return s;
          }
          var plotly = load("{PLOTLY_URL}");
          window.Plotly = new Promise(function (ok, fail) {
            plotly.onload = function () { performance.mark("plotly-ready"); ok(window.Plotly); };
            plotly.onerror = fail;
          });
          {CHUNKS}.forEach(function (path) { load("{PREFIX}_dash-component-suites/" + path); });
        })();
        </script>
    </head>
    <body>
        {%app_entry%}
        <footer>
            {%config%}
            {%scripts%}
            <script>{NATIVE_RESTORE}</script>
            {%renderer%}
        </footer>
    </body>
</html>"""
# Runs after Dash's scripts, before its renderer draws anything: the browser's own functions back in place.
NATIVE_RESTORE = """(function (n) {
  if (!n) { return; }
  var S = String.prototype;
  S.trim = n.trim; S.trimStart = n.trimStart; S.trimEnd = n.trimEnd; S.trimLeft = n.trimStart;
  S.trimRight = n.trimEnd; window.parseInt = Number.parseInt = n.parseInt;
  window.parseFloat = Number.parseFloat = n.parseFloat;
})(window.__tunerNative);"""
class StudyCache:
    """The last few studies loaded, keyed by (name, fingerprint): a refresh that finds nothing new costs one
    small query, and the study page's callbacks share one load. A value being built is built once: a second
    caller (the page's callback arriving while a prefetch runs) waits for it instead of building it again."""

    def __init__(self, store: Store, size: int = 8) -> None:
        self.store, self.size = store, size
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.building: dict[tuple, Future] = {}
        self.queued: set[str] = set()  # names waiting for the prefetch worker
        self.lock = threading.Lock()
        self.prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-prefetch")

    def _get(self, key: tuple, build) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            pending = self.building.get(key)
            if pending is None:
                pending = self.building[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            value = build()
        except BaseException as err:
            with self.lock:
                del self.building[key]
            pending.set_exception(err)
            raise
        with self.lock:
            del self.building[key]
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        pending.set_result(value)
        return value

    def prefetch(self, name: str) -> bool:
        """Start building a study page's data and figures in the background. Called when the browser asks for
        the page's HTML: the server then works while the browser parses the Dash bundles, instead of after
        the page's first callback arrives (about half a second later).

        At most `size` names wait at once and a name waits once: a burst of page requests (a reload storm, a
        crawler) cannot queue unbounded work. A request left out loses nothing but the head start: the page's
        own callback builds the study. False when left out."""
        with self.lock:
            if name in self.queued or len(self.queued) >= self.size:
                return False
            self.queued.add(name)

        def build() -> None:
            with self.lock:
                self.queued.discard(name)
            with contextlib.suppress(Exception):  # the page's own callback reports a bad name or store error
                self.figures(name, abs_gap=False)

        self.prefetcher.submit(build)
        return True

    def _stamp(self, name: str) -> tuple:
        stamp = queries.study_stamp(self.store, name)
        if stamp == (None,):
            raise TunerError(f"no study named '{name}' in {safe_url(self.store.url)}")
        return stamp

    def study(self, name: str) -> tuple[tuple, StudyData]:
        stamp = self._stamp(name)
        return stamp, self._get((name, stamp, "data"), lambda: load_study(self.store, name))

    def figures(self, name: str, abs_gap: bool) -> tuple[tuple, StudyData, dict[str, dict]]:
        """The study and its figures, both of the same state of the store (one fingerprint for both)."""
        stamp = self._stamp(name)
        data = self._get((name, stamp, "data"), lambda: load_study(self.store, name))
        figs = self._get((name, stamp, f"figures-{abs_gap}"), lambda: _figures(data, abs_gap))
        return stamp, data, figs


def _figures(data: StudyData, abs_gap: bool) -> dict[str, dict]:
    """Figures as plain dicts (what dcc.Graph sends anyway), with uirevision so zoom survives refreshes."""
    out = {}
    for key, fig in figures.all_figures(data, abs_gap=abs_gap).items():
        fig.update_layout(uirevision=f"{data.name}:{key}")
        out[key] = fig.to_plotly_json()
    return out


def create_app(store_url: str | None = None, token: str | None = None, refresh_ms: int = REFRESH_MS) -> Dash:
    """The Dash app over the store at `store_url` (default: $TUNER_STORAGE or the user's SQLite file).

    With `token`, every request needs `?token=TOKEN` once (it is then kept in a cookie) or that cookie."""
    store = Store(store_url, create=False)  # read-only: a mistyped --storage must not create a store
    cache = StudyCache(store)
    app = Dash(__name__, title="unlearn-tuner dashboards", update_title=None, suppress_callback_exceptions=True,
               serve_locally=True, assets_folder=str(Path(__file__).with_name("no-assets")))
    plotly_url = _serve_plotlyjs(app)
    # CSS inline: the package ships no asset files
    app.index_string = (INDEX.replace("{CSS}", CSS + trialtable.CSS).replace("{PLOTLY_URL}", plotly_url)
                        .replace("{PREFIX}", app.config.requests_pathname_prefix)
                        .replace("{CHUNKS}", json.dumps(LAZY_CHUNKS)).replace("{NATIVE_RESTORE}", NATIVE_RESTORE))
    app.server.extensions["tuner_dashboards"] = cache  # for benchmarks that time a cold server
    app.layout = html.Div([
        dcc.Location(id="url", refresh=False),
        html.Div([dcc.Link("unlearn-tuner: studies", href="/"),
                  html.Span(f"store: {safe_url(store.url)}", className="store")], className="topbar"),
        html.Div(id="page", className="page"),
    ])
    if token:
        _protect(app, token)  # registered first: an unauthorised request never reaches the prefetch
    _prefetch_on_page_request(app, cache)
    api.register(app.server, store)

    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def render_page(pathname: str | None):
        path = pathname or "/"
        if path.startswith("/study/"):
            return study_page(cache, unquote(path[len("/study/"):]), refresh_ms)
        if path in ("/", ""):
            return list_page(store, refresh_ms)
        return html.Div([html.H1("Not found"), html.P(["No page at ", html.Code(path), "; see the ",
                                                       dcc.Link("study list", href="/"), "."])])

    @app.callback(Output("study-list", "children"), Output("list-refresh", "disabled"),
                  Input("list-refresh", "n_intervals"), prevent_initial_call=True)
    def refresh_list(_n):
        rows = queries.study_list(store)
        return study_table(rows), not any(r["status"] == "running" for r in rows)

    @app.callback(
        Output("study-header", "children"), Output("fig-pareto", "figure"), Output("fig-robustness", "figure"),
        Output("fig-attacks", "figure"), Output("fig-hypervolume", "figure"), Output("fig-parallel", "figure"),
        Output("fig-efficiency", "figure"), Output("curve-trials", "options"), Output("study-refresh", "disabled"),
        Output("study-stamp", "data"),
        Input("study-refresh", "n_intervals"), Input("gap-mode", "value"),
        State("study-name", "data"), State("study-stamp", "data"), State("curve-trials", "value"),
        prevent_initial_call=True)
    def refresh_study(_n, gap_mode, name, last_stamp, curve_ids):
        stamp, data, figs = cache.figures(name, gap_mode == "abs")
        if ctx.triggered_id == "study-refresh" and list(stamp) == list(last_stamp or []):
            raise PreventUpdate
        return (study_header(data), figs["fig-pareto"], figs["fig-robustness"], figs["fig-attacks"],
                figs["fig-hypervolume"], figs["fig-parallel"], figs["fig-efficiency"], curve_options(data, curve_ids),
                not data.running, list(stamp))

    @app.callback(Output("trial-tbody", "children"), Output("trial-page-label", "children"),
                  Output("trial-filter-problem", "children"), Output("trial-view", "data"),
                  Output({"type": "trial-sort", "column": ALL}, "children"),
                  Input({"type": "trial-sort", "column": ALL}, "n_clicks"), Input("trial-filter", "value"),
                  Input("trial-prev", "n_clicks"), Input("trial-next", "n_clicks"), Input("study-stamp", "data"),
                  State("trial-view", "data"), State("study-name", "data"), prevent_initial_call=True)
    def refresh_trials(_sorts, filter_text, _prev, _next, _stamp, view_data, name):
        _, data = cache.study(name)
        columns = table_columns(data)
        view = trialtable.View.from_data(view_data, columns)
        trigger = ctx.triggered_id
        if isinstance(trigger, dict):  # a column header
            view = view.sorted_by(trigger["column"])
        elif trigger == "trial-filter":
            view = replace(view, filter=filter_text or "", page=0)
        elif trigger in ("trial-prev", "trial-next"):
            view = replace(view, page=max(0, view.page + (1 if trigger == "trial-next" else -1)))
        rows, label, view, problem = trialtable.body(table_rows(data), view, columns)
        return rows, label, problem, view.as_data(), trialtable.sort_marks(view, columns)

    @app.callback(Output("trial-wrap", "className"), Input("trial-columns", "value"), prevent_initial_call=True)
    def toggle_columns(value):
        return "trial-wrap wrap" + (" all-columns" if value else "")

    @app.callback(Output("fig-curves", "figure"), Input("curve-trials", "value"), Input("study-stamp", "data"),
                  State("study-name", "data"), prevent_initial_call=True)
    def refresh_curves(trial_ids, _stamp, name):
        _, data = cache.study(name)
        fig = figures.curves(data, [int(t) for t in (trial_ids or [])])
        fig.update_layout(uirevision=f"{name}:fig-curves")
        return fig

    return app


def _serve_plotlyjs(app: Dash) -> str:
    """The URL of the plotly.js bundle the pages load (see dashboards/plotlyjs.py)."""
    prefix = app.config.requests_pathname_prefix
    if not plotlyjs.use_basic():
        return f"{prefix}_dash-component-suites/plotly/package_data/plotly.min.js"
    from flask import Response

    name = f"plotly-basic-{plotlyjs.basic_version()}.min.js"  # versioned name: safe to cache for long
    # Held in memory and sent in one write: streamed from the file in 8 KB blocks, each block waited for
    # the interpreter lock while the server built the study page, and the bundle arrived late.
    body = Path(plotlyjs.BASIC).read_bytes()
    app.server.add_url_rule(f"{prefix}_tuner/{name}", "tuner_plotlyjs", lambda: Response(
        body, mimetype="text/javascript", headers={"Cache-Control": "public, max-age=31536000, immutable"}))
    return f"{prefix}_tuner/{name}"


def _prefetch_on_page_request(app: Dash, cache: StudyCache) -> None:
    from flask import request

    prefix = app.config.requests_pathname_prefix + "study/"

    @app.server.before_request
    def _prefetch():
        if request.method == "GET" and request.path.startswith(prefix) and len(request.path) > len(prefix):
            cache.prefetch(request.path[len(prefix):])  # werkzeug has decoded the path once, as the page does


def _protect(app: Dash, token: str) -> None:
    from flask import abort, request

    server = app.server

    @server.before_request
    def _check():
        given = request.args.get("token") or request.cookies.get("tuner_dashboard_token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(401)

    @server.after_request
    def _remember(response):
        if request.args.get("token"):
            response.set_cookie("tuner_dashboard_token", request.args["token"], httponly=True, samesite="Strict")
        return response


# ---- the study list -------------------------------------------------------------------------------------------

def list_page(store: Store, refresh_ms: int) -> html.Div:
    rows = queries.study_list(store)
    return html.Div([
        html.H1("Unlearning studies"),
        html.P(f"Each study tunes the {LR.label}, {EPOCHS.label} and each method's own hyperparameters of "
               "unlearning methods against the approximate-retraining target. Pick one to see its Pareto fronts, "
               "robustness and guidelines.", className="lead"),
        html.Div(study_table(rows), id="study-list"),
        dcc.Interval(id="list-refresh", interval=refresh_ms, disabled=not any(r["status"] == "running" for r in rows)),
    ])


def study_table(rows: list[dict[str, Any]]) -> html.Div | html.P:
    if not rows:
        return html.P("No studies in this store yet: run `tuner study run studies/quickstart.yaml`.")
    head = html.Thead(html.Tr([html.Th(h) for h in ("study", "model", "status", "finished trials", "search units",
                                                     "created", "notes")]))
    body = []
    for r in rows:
        budget = f" of {r['budget'] * r['units']}" if r.get("budget") and r["units"] else ""
        running = r["by_status"].get("running", 0)
        status = r["status"] + (f" ({running} trials running)" if running else "")
        body.append(html.Tr([
            html.Td(dcc.Link(r["name"], href="/study/" + quote(r["name"], safe=""), className="study-link")),
            html.Td(r["model"]), html.Td(status, className="live" if r["status"] == "running" else None),
            html.Td(f"{r['finished']}{budget}"), html.Td(str(r["units"])),
            html.Td(f"{r['created_at']:%Y-%m-%d %H:%M}" if r.get("created_at") else "–"),
            html.Td(r["notes"], className="notes"),
        ]))
    return html.Table([head, html.Tbody(body)], className="simple", id="study-table")


# ---- a study --------------------------------------------------------------------------------------------------

def study_page(cache: StudyCache, name: str, refresh_ms: int) -> html.Div:
    try:
        stamp, data, figs = cache.figures(name, abs_gap=False)
    except TunerError as err:
        return html.Div([html.H1("Study not found"), html.P(str(err), className="error"),
                         dcc.Link("back to the study list", href="/")])
    curve_ids = data.default_curve_trials()  # what figs["fig-curves"] shows
    graph = {sid: _graph(sid, figs[sid]) for sid in figs}
    sections = {sid: (title, lead) for sid, title, lead in SECTIONS}
    return html.Div([
        dcc.Store(id="study-name", data=data.name), dcc.Store(id="study-stamp", data=list(stamp)),
        dcc.Interval(id="study-refresh", interval=refresh_ms, disabled=not data.running),
        html.H1(f"Study {data.name}", id="study-title"),
        html.Div(data.notes, className="notes", id="study-notes") if data.notes else None,
        html.Nav([html.A(title, href=f"#{sid}") for sid, title, _ in SECTIONS]
                 + [html.A("Guidelines", href="#guidelines"), html.A("Trial table", href="#trials")],
                 className="sections"),
        html.Div(study_header(data), id="study-header"),
        _section("fig-pareto", sections, [
            html.Div([html.Label("x axis:"), dcc.RadioItems(id="gap-mode", value="signed", inline=True, options=[
                {"label": " forget gap (signed)", "value": "signed"}, {"label": " |forget gap|", "value": "abs"}])],
                className="controls"),
            graph["fig-pareto"]]),
        _section("fig-robustness", sections, [graph["fig-robustness"]]),
        _section("fig-attacks", sections, [graph["fig-attacks"]]),
        _section("fig-curves", sections, [
            html.Div([html.Label("trials:"), dcc.Dropdown(id="curve-trials", options=curve_options(data, curve_ids),
                                                          value=curve_ids, multi=True, style={"minWidth": "640px"})],
                     className="controls"),
            graph["fig-curves"]]),
        _section("fig-hypervolume", sections, [graph["fig-hypervolume"]]),
        _section("fig-parallel", sections, [graph["fig-parallel"]]),
        html.Section([html.H2("4c. Trials"), html.P("Sort by clicking a column header (again to reverse); filter "
                                                    "with terms like status = failed, forget_gap > 0.1 or a unit "
                                                    "name, separated by commas.", className="lead"),
                      trialtable.layout(table_rows(data), columns=table_columns(data))], id="trials"),
        _section("fig-efficiency", sections, [graph["fig-efficiency"]]),
    ])


def _section(sid: str, sections: dict[str, tuple[str, str]], children: list) -> html.Section:
    title, lead = sections[sid]
    return html.Section([html.H2(title), html.P(lead, className="lead"), *children], id=f"section-{sid}")


def _graph(sid: str, fig: dict) -> dcc.Graph:
    height = (fig.get("layout") or {}).get("height") or 450
    return dcc.Graph(id=sid, figure=fig, config={"displaylogo": False}, style={"height": f"{height}px"})


def study_header(data: StudyData) -> list:
    facts = html.Table(html.Tbody([html.Tr([html.Th(k), html.Td(v)]) for k, v in header_facts(data)]),
                       className="simple facts")
    live = [html.P("The study is running: this page refreshes every few seconds as trials finish.",
                   className="live")] if data.running else []
    return [*live, facts, html.H2("Recommendation", id="recommendation"), recommendation_table(data),
            html.Section([html.H2("5. Tuning guidelines, checked on this study's data"), guideline_table(data)],
                         id="guidelines")]


def recommendation_table(data: StudyData):
    rows = recommendation_rows(data)
    if not rows:
        return html.P(data.recommendation_note or "no recommendation", className="lead")
    def cell(r: dict[str, str], key: str) -> html.Td:
        failing = r["failing"] and key in ("status", "checks")  # a pick that fails the study's robustness limits
        return html.Td(r[key], style={"color": FAILING_COLOUR, "fontWeight": 600} if failing else None,
                       className=f"rec-{key}" + (" failing" if failing else ""))

    return html.Div(html.Table([html.Thead(html.Tr([html.Th(h) for _, h in RECOMMENDATION_COLUMNS])),
                                html.Tbody([html.Tr([cell(r, k) for k, _ in RECOMMENDATION_COLUMNS]) for r in rows])],
                               className="simple", id="recommendation-table"), className="wrap")


def guideline_table(data: StudyData) -> html.Table:
    body = []
    for g in guideline_rows(data):
        body.append(html.Tr([
            html.Td(str(g["number"])), html.Td([html.B(g["title"]), ": " + g["rule"]]),
            html.Td(g["verdict"], className="verdict", style={"color": VERDICT_COLOURS.get(g["verdict"])}),
            html.Td(g["reason"]), html.Td(html.A(g["figure_name"], href=f"#{g['figure']}"))]))
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in ("#", "guideline", "check", "evidence", "figure")])),
                       html.Tbody(body)], className="simple", id="guideline-table")


MAX_CURVE_OPTIONS = 80


def curve_options(data: StudyData, keep: list[int] | None = None) -> list[dict[str, Any]]:
    """Trials offered for the curve figure: the recommended ones, each method's Pareto front, then the trials
    closest to the target, at most MAX_CURVE_OPTIONS (a dropdown indexes every label it holds), plus `keep`."""
    picked = set(data.recommended_ids().values())
    with_curve = [r for r in data.rows if r["id"] in data.curves]
    closest = sorted(with_curve, key=lambda r: (r["id"] not in picked, not r["pareto"],
                                                abs(r["metrics"].get("forget_gap") if r["metrics"].get("forget_gap")
                                                    is not None else math.inf)))
    chosen = {r["id"] for r in closest[:MAX_CURVE_OPTIONS]} | set(keep or [])
    out = []
    for r in with_curve:
        if r["id"] not in chosen:
            continue
        gap = r["metrics"].get("forget_gap")
        label = (f"{r['unit']} #{r['number']} ({r['status']}, gap {fmt(gap, '+.3f')})"
                 + (" ★" if r["id"] in picked else ""))
        out.append({"label": label, "value": r["id"]})
    return out


def serve(store_url: str | None, host: str = "127.0.0.1", port: int = 8050, token: str | None = None) -> None:
    app = create_app(store_url, token=token)
    app.run(host=host, port=port, debug=False)

