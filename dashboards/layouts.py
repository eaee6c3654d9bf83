"""The dashboards' pages as Dash components: the study list, and a study's page (its sections, figures,
recommendation, guideline checks and trial table). The callbacks that refresh them are in `dashboards.app`."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

from dash import dcc, html

from dashboards import queries, trialtable
from dashboards.cache import StudyCache
from dashboards.data import StudyData, fmt, table_columns, table_rows
from dashboards.figures.front import x_options
from dashboards.page import (
    FAILING_COLOUR,
    RECOMMENDATION_COLUMNS,
    SECTIONS,
    VERDICT_COLOURS,
    guideline_rows,
    header_facts,
    recommendation_rows,
)
from tuner.core.errors import TunerError
from tuner.core.hparams import EPOCHS, LR
from tuner.store import Store

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
        stamp, data, figs = cache.figures(name)
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
                {"label": f" {label}", "value": value} for value, label in x_options(data)])],
                className="controls"),
            graph["fig-pareto"]]),
        _section("fig-robustness", sections, [graph["fig-robustness"]]),
        _section("fig-attacks", sections, [graph["fig-attacks"]]),
        _section("fig-curves", sections, [
            html.Div([html.Label("trials:"), dcc.Dropdown(id="curve-trials", options=curve_options(data, curve_ids),
                                                          value=curve_ids, multi=True, style={"minWidth": "640px"})],
                     className="controls"),
            graph["fig-curves"]]),
        _section("fig-calibration", sections, [graph["fig-calibration"]]),
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

