"""`tuner dashboard`: the Dash web app. A study list at `/`, a page per study at `/study/NAME`.

It only reads the store. A study page is built in one server round trip (every figure in the first
response), then, while the study is running, a `dcc.Interval` asks every few seconds whether the study
changed (a cheap fingerprint query) and redraws only if it did; zoom and legend choices survive redraws.
Dash renders every string as text, so stored names, notes and errors are escaped by construction.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from dashboards import api, figures, plotlyjs, queries, trialtable
from dashboards.cache import StudyCache
from dashboards.data import table_columns, table_rows
from dashboards.layouts import curve_options, list_page, study_header, study_page, study_table
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
        Output("fig-efficiency", "figure"), Output("fig-calibration", "figure"), Output("curve-trials", "options"),
        Output("study-refresh", "disabled"),
        Output("study-stamp", "data"),
        Input("study-refresh", "n_intervals"), Input("gap-mode", "value"),
        State("study-name", "data"), State("study-stamp", "data"), State("curve-trials", "value"),
        prevent_initial_call=True)
    def refresh_study(_n, gap_mode, name, last_stamp, curve_ids):
        stamp, data, figs = cache.figures(name, gap_mode or "signed")
        if ctx.triggered_id == "study-refresh" and list(stamp) == list(last_stamp or []):
            raise PreventUpdate
        return (study_header(data), figs["fig-pareto"], figs["fig-robustness"], figs["fig-attacks"],
                figs["fig-hypervolume"], figs["fig-parallel"], figs["fig-efficiency"], figs["fig-calibration"],
                curve_options(data, curve_ids),
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
