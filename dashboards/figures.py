"""The dashboards' figures: pure functions from `StudyData` to Plotly figures (no store, no Dash).

Every piece of stored text that reaches a figure (study names, units, errors) is HTML-escaped first:
Plotly renders a subset of HTML in titles and hover labels, and decodes the escaped entities back to text.

Figures are assembled as plain dicts (traces, shapes, annotations, axes with hand-set domains) and wrapped
without Plotly's per-property validation: for a 500-trial study that validation alone took longer than the
page's whole budget. `tests/test_dashboards.py` validates every figure once instead.
"""

from __future__ import annotations

import html
import math
from typing import Any

import plotly.graph_objects as go

from dashboards import hypervolume
from dashboards.data import (
    OUTCOME_LABELS,
    StudyData,
    Unit,
    device_seconds,
    efficiency,
    fmt,
    objective_point,
    ordered,
    plotted,
    study_axes,
    tokens,
)
from tuner.hparams import LR, Hyperparameter
from tuner.methods import describe

METHOD_ORDER = ("ga", "random_label", "random_model_label", "adversarial", "retain_finetune", "ga_gd", "ga_kl")
PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#2ca02c", "#d62728", "#17becf", "#bcbd22",
           "#e377c2")
OUTCOME_COLOURS = {"remembered": "#4c78a8", "in_band": "#2ca02c", "over_unlearned": "#f58518",
                   "diverged": "#d62728", "failed": "#7f7f7f", "running": "#c7c7c7", "interrupted": "#c7c7c7",
                   "in_band_damaged": "#a6d96a"}
MAP_CLASSES = ("remembered", "in_band", "in_band_damaged", "over_unlearned", "diverged", "failed", "running")
SOURCE_SYMBOL = {None: "circle", "in_distribution": "circle", "general": "diamond"}
SOURCE_DASH = {None: "solid", "in_distribution": "solid", "general": "dash"}
TRIAL_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
BAND_FILL = "rgba(44, 160, 44, 0.13)"
LOG_TICK_MANTISSAS = (1, 3)  # ticks of a log-scale hyperparameter's axis: ..., 0.1, 0.3, 1, 3, 10, ...
# Drawing time in the browser matters (a study page draws seven figures): margins are set by hand instead of
# automargin (which redraws), tick labels may overflow (checking costs a text measurement per label), and a
# few template lines replace "plotly_white", which carries defaults for every trace type.
AXIS = dict(gridcolor="#ebf0f8", linecolor="#ebf0f8", zerolinecolor="#ebf0f8", ticks="", automargin=False,
            ticklabeloverflow="allow")
TEMPLATE = dict(layout=dict(xaxis=AXIS, yaxis=AXIS, plot_bgcolor="white", paper_bgcolor="white", hovermode="closest",
                            colorway=list(PALETTE)))
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def method_colour(method: str) -> str:
    idx = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER) + sum(map(ord, method)) % 3
    return PALETTE[idx % len(PALETTE)]


def figure(traces: list[dict], layout: dict[str, Any], title: str, height: int,
           margin: dict[str, int] | None = None) -> go.Figure:
    """A figure from plain trace and layout dicts, with the dashboards' title, size, template and font."""
    layout = {"xaxis": {}, "yaxis": {}, **layout,
              "title": dict(text=title, x=0.01, xanchor="left", y=1, yref="container", yanchor="top", pad=dict(t=12),
                            font=dict(size=15)), "height": height,
              "template": TEMPLATE, "font": FONT, "hoverlabel": dict(align="left"),
              "margin": margin or dict(l=70, r=20, t=70, b=55)}
    return go.Figure(data=traces, layout=layout, _validate=False)


def _title(text: str, size: int = 12) -> dict[str, Any]:
    return dict(text=text, font=dict(size=size))


def _empty(title: str, message: str, height: int = 320) -> go.Figure:
    note = dict(text=esc(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                font=dict(size=14, color="#555"))
    return figure([], {"annotations": [note], "xaxis": dict(visible=False), "yaxis": dict(visible=False)},
                  title, height)


def hover(row: dict[str, Any]) -> str:
    """Hyperparameters and metrics of one trial, escaped, for a hover label."""
    m, res = row["metrics"], row["result"]
    lines = [f"<b>{esc(row['unit'])}</b> #{row['number']} (trial {row['id']})",
             f"{esc(row['status'])}: {esc(OUTCOME_LABELS.get(row['map_class'], row['map_class']))}",
             esc(describe(row.get("method"), row["params"])),
             f"forget gap {fmt(m.get('forget_gap'), '+.4f')}, utility drop {fmt(m.get('utility_drop'), '+.4f')}",
             f"MIA AUC {fmt(m.get('mia_auc'))}, forget NLL {fmt(m.get('forget_nll'))}, "
             f"unseen NLL {fmt(m.get('unseen_nll'))}",
             f"steps {fmt(res.get('steps_done'), 'd')} (stop {fmt(res.get('stop_step'), 'd')}, "
             f"kept {fmt(res.get('selected_step'), 'd')}), {fmt(row.get('wall_time_s'), '.1f')} s"]
    if row.get("error"):
        lines.append("error: " + esc(str(row["error"])[:200]))
    return "<br>".join(lines)


def hover_short(row: dict[str, Any], cost: bool = False) -> str:
    """A compact label (the Pareto figure has the full one): trial, outcome, hyperparameters, gap and utility."""
    m = row["metrics"]
    text = (f"<b>{esc(row['unit'])}</b> #{row['number']}: {OUTCOME_LABELS.get(row['map_class'], row['map_class'])}"
            f"<br>{esc(describe(row.get('method'), row['params']))}")
    if m.get("forget_gap") is not None:
        text += f"<br>gap {m['forget_gap']:+.3f}, utility drop {fmt(m.get('utility_drop'), '+.3f')}"
    if cost:
        text += f"<br>{fmt(device_seconds(row), '.1f')} device-s, {tokens(row):,} tokens"
    if row.get("error"):
        text += "<br>error: " + esc(str(row["error"])[:120])
    return text


# ---- 1. Pareto front -------------------------------------------------------------------------------------------

def pareto(data: StudyData, abs_gap: bool = False) -> go.Figure:
    """Forget gap against utility drop, one colour per method (symbol and dash per retain source); each unit's
    Pareto front (over the study's own objectives) as a line, dominated trials faded, the target band, the
    utility tolerance and each unit's recommended point. Traces carry `meta` = {unit, role} for tests."""
    title = f"Pareto front across methods: {'|forget gap|' if abs_gap else 'forget gap'} against utility drop"
    tol, util_tol = data.target["gap_tolerance"], data.target["utility_tolerance"]
    shapes = [dict(type="rect", xref="x", yref="y domain", x0=0.0 if abs_gap else -tol, x1=tol, y0=0, y1=1,
                   fillcolor=BAND_FILL, line=dict(width=0), layer="below"),
              dict(type="line", xref="x", yref="y domain", x0=0, x1=0, y0=0, y1=1,
                   line=dict(color="#2ca02c", width=1.5, dash="dot")),
              dict(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=util_tol, y1=util_tol,
                   line=dict(color="#d62728", width=1.2, dash="dash"))]
    notes = [dict(text=f"target band |gap| ≤ {tol:g}", x=0.0 if abs_gap else -tol, y=1, xref="x", yref="y domain",
                  xanchor="left", yanchor="top", showarrow=False, font=dict(size=11)),
             dict(text=f"utility tolerance {util_tol:g}", x=1, y=util_tol, xref="x domain", yref="y",
                  xanchor="right", yanchor="bottom", showarrow=False, font=dict(size=11))]

    def xval(row: dict[str, Any]) -> float:
        gap = row["metrics"]["forget_gap"]
        return abs(gap) if abs_gap else gap

    rec_ids = data.recommended_ids()
    overall = data.overall_id()
    traces: list[dict] = []
    shown_star = False
    for unit in data.units.values():
        rows = [r for r in unit.rows if plotted(r)]
        colour = method_colour(unit.method)
        symbol = SOURCE_SYMBOL.get(unit.retain_source, "square")
        front = sorted((r for r in rows if r["pareto"]), key=xval)
        dominated = [r for r in rows if not r["pareto"]]
        common = dict(type="scatter", legendgroup=unit.name, hovertemplate="%{hovertext}<extra></extra>")
        traces.append(dict(
            x=[xval(r) for r in front], y=[r["metrics"]["utility_drop"] for r in front], mode="lines+markers",
            name=esc(unit.name), hovertext=[hover(r) for r in front], customdata=[r["id"] for r in front],
            marker=dict(color=colour, size=9, symbol=symbol, line=dict(color="white", width=0.5)),
            line=dict(color=colour, width=2, dash=SOURCE_DASH.get(unit.retain_source, "dot")),
            meta={"unit": unit.name, "role": "front"}, **common))
        traces.append(dict(
            x=[xval(r) for r in dominated], y=[r["metrics"]["utility_drop"] for r in dominated], mode="markers",
            name=esc(unit.name) + " (dominated)", showlegend=False, hovertext=[hover(r) for r in dominated],
            customdata=[r["id"] for r in dominated], opacity=0.3,
            marker=dict(color=colour, size=7, symbol=symbol), meta={"unit": unit.name, "role": "dominated"}, **common))
        rec = data.row(rec_ids.get(unit.name))
        if rec is not None and plotted(rec):
            status = (data.recommendation or {}).get("units", {}).get(unit.name, {}).get("status", "")
            traces.append(dict(
                type="scatter", x=[xval(rec)], y=[rec["metrics"]["utility_drop"]], mode="markers",
                name="recommended per method (★; hollow: closest, none in band)", showlegend=not shown_star,
                legendgroup="recommended", hovertext=["<b>recommended</b> (" + esc(status) + ")<br>" + hover(rec)],
                hovertemplate="%{hovertext}<extra></extra>", customdata=[rec["id"]],
                marker=dict(symbol="star" if status == "recommended" else "star-open",
                            size=20 if rec["id"] == overall else 16, color=colour,
                            line=dict(color="black", width=1.5)),
                meta={"unit": unit.name, "role": "recommended"}))
            shown_star = True
    traces += _references(data, abs_gap)
    r = data.row(overall)
    if r is not None and plotted(r):
        notes.append(dict(x=xval(r), y=r["metrics"]["utility_drop"], text="overall pick: " + esc(r["unit"]),
                          showarrow=True, arrowhead=2, ax=40, ay=-40, font=dict(size=11)))
    layout = dict(shapes=shapes, annotations=notes, legend=dict(orientation="v", x=1.01, y=1, font=dict(size=11)),
                  xaxis=dict(title=_title(("|forget gap|" if abs_gap else "forget gap") + " = NLL(forget) − "
                                          "NLL(unseen)  (< 0 remembered, > 0 over-unlearned)"), zeroline=False),
                  yaxis=dict(title=_title("utility drop (retain NLL − original, nats)")))
    return figure(traces, layout, title, 560)


def _references(data: StudyData, abs_gap: bool) -> list[dict]:
    """The original model (before unlearning) and, on the testbed, the exact-retrain model as reference points."""
    base = data.baseline or {}
    out = []
    for label, ref, symbol in (("original model", base, "x"), ("exact retrain (testbed)", data.exact_retrain, "cross")):
        if not ref or ref.get("forget_gap") is None:
            continue
        drop = ref.get("retain_nll", 0.0) - base.get("retain_nll", ref.get("retain_nll", 0.0))
        gap = ref["forget_gap"]
        out.append(dict(type="scatter", x=[abs(gap) if abs_gap else gap], y=[drop], mode="markers", name=label,
                        marker=dict(symbol=symbol, size=12, color="black"),
                        hovertemplate=f"<b>{label}</b><br>forget gap {gap:+.4f}<br>utility drop {drop:+.4f}"
                                      "<extra></extra>", meta={"role": "reference"}))
    return out


# ---- 2. Robustness map ------------------------------------------------------------------------------------------

def robustness(data: StudyData, columns: int = 5) -> go.Figure:
    """Per unit, the learning rate against each of its other hyperparameters (epochs, λ, the method's own
    knobs) coloured by outcome; the learning-rate span of the unit's successes (in the band, utility drop within
    tolerance: its success window) is shaded.

    The panels are small multiples on shared axes: one learning-rate axis per column and, in each block of
    units, one row of panels per hyperparameter the block's units search besides the learning rate (one axis
    per row, its range from that row's trials, log-scaled or whole-numbered as the hyperparameter is declared),
    labelled on the outer panels. Windows compare side by side, zoom acts on a whole column or row, and the
    figure has one axis per column and row instead of one pair per panel (plotly.js draws a clip path for
    every x-y axis pair, so 28 axes cost 224 of them)."""
    units = [u for u in data.units.values() if u.rows]
    title = "Robustness map: where each method succeeds (guidelines 2 and 3)"
    if not units:
        return _empty(title, "no trials yet")
    cols = min(columns, len(units))
    blocks = math.ceil(len(units) / cols)
    block_units = [units[b * cols:(b + 1) * cols] for b in range(blocks)]
    # a block (row of units) gets one row of panels per hyperparameter its units' rows carry besides the
    # learning rate (two methods' same-named knobs are two rows); one row against nothing when there is none
    block_axes: list[list[Hyperparameter | None]] = [ordered(hp for u in bu for hp in u.axes) or [None]
                                                     for bu in block_units]
    first_row = [sum(len(a) for a in block_axes[:b]) for b in range(blocks)]
    rows_n = sum(len(a) for a in block_axes)
    # sizes in pixels, turned into paper fractions: panels, the gap inside a block, the gap between blocks
    # (tick labels, the axis title and the next block's two-line panel titles)
    panel_px, inner_px, block_px = 175, 24, 100
    plot_px = rows_n * panel_px + (rows_n - blocks) * inner_px + (blocks - 1) * block_px
    hs, vs, block_gap = 0.035, inner_px / plot_px, block_px / plot_px
    width = (1 - hs * (cols - 1)) / cols
    height = panel_px / plot_px
    # which panels exist: (panel row, column) -> (unit, the hyperparameter on y, or None)
    panels: dict[tuple[int, int], tuple[Unit, Hyperparameter | None]] = {}
    row_block: dict[int, int] = {}
    for b, bu in enumerate(block_units):
        for k, hp in enumerate(block_axes[b]):
            row_block[first_row[b] + k] = b
            for col, u in enumerate(bu):
                if hp is None or hp in u.axes:
                    panels[first_row[b] + k, col] = (u, hp)
    layout: dict[str, Any] = {}
    lr_range = _axis_range(LR, [r["params"][LR.name] for u in units for r in u.rows
                                if r["params"].get(LR.name) is not None])
    for col in range(cols):  # one lr axis per column, drawn under the column's lowest panel
        bottom = max((row for row, c in panels if c == col), default=rows_n - 1)
        x0 = col * (width + hs)
        layout[_axis_key("x", col)] = dict(
            type="log" if LR.log else "linear", range=lr_range, domain=_domain(x0, x0 + width),
            anchor=_axis_id("y", bottom), tickfont=dict(size=9), tickformat=".0e" if LR.log else None, nticks=5,
            tickangle=0, title=_title(LR.label, 10))
    for row in range(rows_n):  # one axis per row of panels, drawn left of the row's first panel
        block = row_block[row]
        hp = block_axes[block][row - first_row[block]]
        y1 = 1 - row * height - (row - block) * vs - block * block_gap
        first = min(c for r, c in panels if r == row)
        values = [u.value(r, hp) for (pr, _), (u, _) in panels.items() if pr == row and hp is not None
                  for r in u.rows]
        layout[_axis_key("y", row)] = dict(domain=_domain(y1 - height, y1), anchor=_axis_id("x", first),
                                           tickfont=dict(size=9), **_param_axis(hp, [v for v in values if v is not None]))
    traces, shapes, notes = [], [], []
    shown: set[str] = set()
    for (row, col), (u, hp) in sorted(panels.items()):
        xa, ya = _axis_id("x", col), _axis_id("y", row)
        block = row_block[row]
        if row == first_row[block]:  # the unit's title over the block's top row
            x0, y1 = col * (width + hs), layout[_axis_key("y", row)]["domain"][1]
            notes.append(dict(text=f"<b>{esc(u.name)}</b><br>{len(u.successes)}/{len(u.finished)} succeed, "
                                   f"window {u.window_decades:.2f} decades of {esc(LR.short)}",
                              x=x0 + width / 2, y=y1, xref="paper", yref="paper", xanchor="center",
                              yanchor="bottom", showarrow=False, font=dict(size=11)))
        # one trace per panel, coloured point by point (a trace per outcome and panel draws slower)
        rs = [r for r in u.rows if r["map_class"] in MAP_CLASSES and r["params"].get(LR.name) is not None
              and (hp is None or u.value(r, hp) is not None)]
        rs.sort(key=lambda r: MAP_CLASSES.index(r["map_class"]))
        damaged = [r["map_class"] == "in_band_damaged" for r in rs]
        traces.append(dict(
            type="scatter", x=[r["params"][LR.name] for r in rs], y=[0 if hp is None else u.value(r, hp) for r in rs],
            mode="markers", showlegend=False, xaxis=xa, yaxis=ya,
            marker=dict(color=[OUTCOME_COLOURS[r["map_class"]] for r in rs], size=9,
                        symbol=["x" if r["map_class"] in ("diverged", "failed") else "circle" for r in rs],
                        line=dict(color=["#d62728" if d else "white" for d in damaged],
                                  width=[1.5 if d else 0.5 for d in damaged])),
            hovertext=[hover_short(r) for r in rs], hovertemplate="%{hovertext}<extra></extra>",
            customdata=[r["map_class"] for r in rs], meta={"unit": u.name, "role": "trials",
                                                           "y": hp.name if hp is not None else None}))
        shown.update(r["map_class"] for r in rs)
        ok = [r["params"][LR.name] for r in u.successes if r["params"].get(LR.name)]
        if ok:
            lo, hi = (min(ok) / 1.08, max(ok) * 1.08) if LR.log else (min(ok), max(ok))
            shapes.append(dict(type="rect", xref=xa, yref=f"{ya} domain", x0=lo, x1=hi,
                               y0=0, y1=1, fillcolor=BAND_FILL, line=dict(width=0), layer="below"))
    for cls in MAP_CLASSES:  # the legend: one entry per outcome that occurs
        if cls in shown:
            traces.append(dict(type="scatter", x=[None], y=[None], mode="markers", name=OUTCOME_LABELS[cls],
                               marker=dict(color=OUTCOME_COLOURS[cls], size=9,
                                           symbol="x" if cls in ("diverged", "failed") else "circle",
                                           line=dict(color="#d62728" if cls == "in_band_damaged" else "white",
                                                     width=1.5 if cls == "in_band_damaged" else 0.5)),
                               hoverinfo="skip", meta={"role": "legend", "class": cls}))
    layout.update(shapes=shapes, annotations=notes,
                  legend=dict(orientation="h", y=1 + 48 / plot_px, yanchor="bottom", x=1, xanchor="right",
                              itemclick=False, itemdoubleclick=False))
    return figure(traces, layout, title, plot_px + 150, margin=dict(l=55, r=20, t=110, b=40))


def _axis_id(letter: str, index: int) -> str:
    """Plotly's id of the index-th (0-based) x or y axis: 'x', 'x2', ..."""
    return letter if index == 0 else f"{letter}{index + 1}"


def _axis_key(letter: str, index: int) -> str:
    return f"{letter}axis" if index == 0 else f"{letter}axis{index + 1}"


def _domain(lo: float, hi: float) -> list[float]:
    """An axis domain inside [0, 1] (sums of many fractions can land a rounding error outside it)."""
    return [min(1.0, max(0.0, lo)), min(1.0, max(0.0, hi))]


def _axis_range(hp: Hyperparameter, values: list[float]) -> list[float] | None:
    """An axis range covering `values` on the hyperparameter's declared scale: a log axis (in decades) padded by
    8% (at least 0.1 decade) each side, a whole-number axis by half a step, a linear one by 8%."""
    if hp.log:
        values = [v for v in values if v > 0]
    if not values:
        return None
    lo, hi = hp.coordinate(min(values)), hp.coordinate(max(values))
    if hp.log:
        pad = max(0.1, (hi - lo) * 0.08)
    elif hp.integer:
        pad = 0.5
    else:
        pad = (hi - lo) * 0.08 or max(abs(lo) * 0.1, 0.5)
    return [lo - pad, hi + pad]


def _param_axis(hp: Hyperparameter | None, values: list[float]) -> dict[str, Any]:
    """The y axis of a row of robustness panels: type, range, ticks and title from the declaration."""
    if hp is None:  # a unit whose rows carry no hyperparameter besides the learning rate
        return dict(type="linear", range=[-1, 1], showticklabels=False, title=_title("(learning rate only)", 10))
    axis: dict[str, Any] = dict(range=_axis_range(hp, values), title=_title(esc(hp.label), 10))
    if hp.log:
        axis["type"] = "log"
        ticks = _log_ticks(axis["range"])
        if len(ticks) >= 2:
            axis["tickvals"] = ticks
        else:  # under about half a decade: a few of plotly's own ticks
            axis["nticks"] = 4
    else:
        axis["type"] = "linear"
        if hp.integer:
            span = (max(values) - min(values)) if values else 0
            axis["dtick"] = _whole_step(span)
    return axis


def _log_ticks(rng: list[float] | None) -> list[float]:
    """1-3 ticks (1 and 3 times powers of ten) inside a log range; powers of ten alone over more than 3 decades,
    1-2-5 ticks when 1-3 would leave fewer than two."""
    if rng is None:
        return []
    for mantissas in ((1,) if rng[1] - rng[0] > 3.5 else LOG_TICK_MANTISSAS, (1, 2, 5)):
        ticks = [float(f"{m}e{k}") for k in range(math.floor(rng[0]), math.ceil(rng[1]) + 1) for m in mantissas
                 if rng[0] <= math.log10(m) + k <= rng[1]]
        if len(ticks) >= 2:
            break
    return ticks


def _whole_step(span: float) -> int:
    """Tick step of a whole-number axis: 1, or a round step (2, 5, 10, ...) that keeps about 8 ticks or fewer."""
    step = 1
    while span / step > 8:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return step


# ---- 3. Unlearning curves ---------------------------------------------------------------------------------------

def curves(data: StudyData, trial_ids: list[int] | None = None) -> go.Figure:
    """Forget, unseen and retain NLL against step (top) and the forget gap with the target band (bottom) for the
    chosen trials; stop points marked; on the testbed the exact-retrain forget NLL as a reference line."""
    ids = [t for t in (trial_ids if trial_ids is not None else data.default_curve_trials()) if t in data.curves]
    title = "Unlearning curves: forget / unseen / retain NLL and forget gap against step"
    if not ids:
        return _empty(title, "no curve recorded for the chosen trials")
    tol = data.target["gap_tolerance"]
    styles = (("forget_nll", "forget NLL", "solid"), ("unseen_nll", "unseen NLL (target)", "dash"),
              ("retain_nll", "retain NLL", "dot"))
    traces: list[dict] = []
    shapes = [dict(type="rect", xref="x2 domain", yref="y2", x0=0, x1=1, y0=-tol, y1=tol, fillcolor=BAND_FILL,
                   line=dict(width=0), layer="below"),
              dict(type="line", xref="x2 domain", yref="y2", x0=0, x1=1, y0=0, y1=0,
                   line=dict(color="#2ca02c", dash="dot"))]
    notes = [dict(text=f"target: gap 0 (band ±{tol:g})", x=1, y=0, xref="x2 domain", yref="y2", xanchor="right",
                  yanchor="top", showarrow=False, font=dict(size=10))]
    if data.exact_retrain and data.exact_retrain.get("forget_nll") is not None:
        y = data.exact_retrain["forget_nll"]
        shapes.append(dict(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=y, y1=y,
                           line=dict(color="black", width=1.2, dash="longdash")))
        notes.append(dict(text="exact-retrain forget NLL (testbed)", x=0, y=y, xref="x domain", yref="y",
                          xanchor="left", yanchor="bottom", showarrow=False, font=dict(size=10)))
    for k, tid in enumerate(ids):
        row = data.row(tid)
        pts = data.curves[tid]
        colour = TRIAL_PALETTE[k % len(TRIAL_PALETTE)]
        label = f"{esc(row['unit'])} #{row['number']}" if row else f"trial {tid}"
        steps = [p["step"] for p in pts]
        for key, name, dash in styles:
            traces.append(dict(type="scatter", x=steps, y=[p.get(key) for p in pts], mode="lines+markers",
                               name=f"{label}: {name}", legendgroup=str(tid), line=dict(color=colour, dash=dash, width=2),
                               marker=dict(size=4), meta={"trial": tid, "role": key}, xaxis="x", yaxis="y",
                               hovertemplate=f"{label}<br>step %{{x}}<br>{name} %{{y:.4f}}<extra></extra>"))
        traces.append(dict(type="scatter", x=steps, y=[p.get("forget_gap") for p in pts], mode="lines+markers",
                           name=f"{label}: forget gap", legendgroup=str(tid), showlegend=False, xaxis="x2", yaxis="y2",
                           line=dict(color=colour, width=2), marker=dict(size=4),
                           meta={"trial": tid, "role": "forget_gap"},
                           hovertemplate=f"{label}<br>step %{{x}}<br>forget gap %{{y:+.4f}}<extra></extra>"))
        res = row["result"] if row else {}
        stop, kept = res.get("stop_step"), res.get("selected_step")
        if stop is not None:
            for xa in ("x", "x2"):
                shapes.append(dict(type="line", xref=xa, yref=f"{xa.replace('x', 'y')} domain", x0=stop, x1=stop,
                                   y0=0, y1=1, line=dict(color=colour, width=1, dash="dot")))
        gap_at = next((p.get("forget_gap") for p in pts if p["step"] == kept), None)
        if kept is not None and gap_at is not None:
            traces.append(dict(type="scatter", x=[kept], y=[gap_at], mode="markers", legendgroup=str(tid),
                               showlegend=False, xaxis="x2", yaxis="y2", meta={"trial": tid, "role": "selected"},
                               marker=dict(symbol="diamond-open", size=13, color=colour, line=dict(width=2)),
                               hovertemplate=f"{label}<br>kept checkpoint: step {kept}"
                                             + (f", stopped at {stop}" if stop is not None else "") + "<extra></extra>"))
    layout = dict(shapes=shapes, annotations=notes, legend=dict(font=dict(size=10)),
                  xaxis=dict(domain=[0, 1], anchor="y", matches="x2", showticklabels=False),
                  yaxis=dict(domain=[0.41, 1], anchor="x", title=_title("NLL (nats/token)")),
                  xaxis2=dict(domain=[0, 1], anchor="y2", title=_title(
                      "optimiser step (dotted vertical: stopped at the target; ◇ kept checkpoint)")),
                  yaxis2=dict(domain=[0, 0.35], anchor="x2", title=_title("forget gap")))
    return figure(traces, layout, title, 620)


# ---- 2b. Robustness under attack ---------------------------------------------------------------------------------

# (role, legend label, the candidate's metric, marker symbol, colour): the gap before, and after each attack
ATTACK_KINDS = (("before", "own forget gap (before)", "forget_gap", "circle", "#444444"),
                ("relearn", "after the relearning attack", "relearn_gap", "triangle-up", "#d62728"),
                ("quant4", "after 4-bit quantization", "quant4_gap", "square", "#9467bd"),
                ("quant8", "after 8-bit quantization", "quant8_gap", "diamond", "#17becf"))
NO_CHECKS = "no robustness checks ran: set robustness.when in the spec"


def _attack_value(cand: dict[str, Any], key: str) -> float | None:
    value = cand["forget_gap"] if key == "forget_gap" else cand["metrics"].get(key)
    return value if value is not None and math.isfinite(value) else None


def attack_hover(cand: dict[str, Any], label: str, value: float) -> str:
    """One checked candidate: trial, step, setting, its gaps before and after each attack, the relearn speed."""
    row, m = cand["row"], cand["metrics"]
    lines = [f"<b>{esc(label)}: {value:+.4f}</b>",
             f"<b>{esc(row['unit'])}</b> #{row['number']} (trial {row['id']}), step {cand['step']}"
             + (" (kept checkpoint)" if cand["kept"] else ""),
             esc(describe(row.get("method"), row["params"])),
             f"forget gap {fmt(cand['forget_gap'], '+.4f')} before; after relearning {fmt(m.get('relearn_gap'), '+.4f')} "
             f"(held-out slice before the attack {fmt(m.get('relearn_gap_before'), '+.4f')})",
             f"relearns {fmt(m.get('relearn_speed_ratio'), '.2f')}x as fast as the exact-retrain model",
             f"4-bit gap {fmt(m.get('quant4_gap'), '+.4f')} (utility drop {fmt(m.get('quant4_utility_drop'), '+.3f')}), "
             f"8-bit gap {fmt(m.get('quant8_gap'), '+.4f')}"]
    return "<br>".join(lines)


def attacks(data: StudyData) -> go.Figure:
    """Per unit (x, one group each), every checked candidate's forget gap before (its own) and after the
    relearning attack and after 4- and 8-bit quantization, a thin line joining a candidate's before and after
    points; the exact-retrain model's gap after the same attack (and before it) as horizontal references, the
    target band shaded. A gap that falls below the band after an attack: the forget set came back. Traces
    carry `meta` = {unit, role} (role: a kind of `ATTACK_KINDS`, "links", "retrain_relearn", "retrain_before")."""
    title = "Robustness under attack: the forget gap before and after relearning and quantization"
    cands = data.checked_candidates()
    if not cands:
        return _empty(title, NO_CHECKS)
    tol = data.target["gap_tolerance"]
    units = [u for u in data.units if any(c["row"]["unit"] == u for c in cands)]
    traces: list[dict] = []
    for i, unit in enumerate(units):
        mine = [c for c in cands if c["row"]["unit"] == unit]
        n = len(mine)
        xs = [i if n == 1 else i - 0.35 + 0.7 * (k + 0.5) / n for k in range(n)]
        link_x: list[float | None] = []
        link_y: list[float | None] = []
        for x, c in zip(xs, mine, strict=True):
            before = _attack_value(c, "forget_gap")
            for _, _, key, _, _ in ATTACK_KINDS[1:]:
                after = _attack_value(c, key)
                if before is not None and after is not None:
                    link_x += [x, x, None]
                    link_y += [before, after, None]
        traces.append(dict(type="scatter", x=link_x, y=link_y, mode="lines", showlegend=False, hoverinfo="skip",
                           line=dict(color="#b0b0b0", width=1), meta={"unit": unit, "role": "links"}))
        for role, label, key, symbol, colour in ATTACK_KINDS:
            pts = [(x, c, v) for x, c in zip(xs, mine, strict=True) if (v := _attack_value(c, key)) is not None]
            traces.append(dict(
                type="scatter", x=[p[0] for p in pts], y=[p[2] for p in pts], mode="markers", name=label,
                legendgroup=role, showlegend=i == 0, customdata=[p[1]["row"]["id"] for p in pts],
                hovertext=[attack_hover(p[1], label, p[2]) for p in pts], hovertemplate="%{hovertext}<extra></extra>",
                marker=dict(symbol=symbol, color=colour, size=9 if role == "before" else 10,
                            line=dict(color="white", width=0.5)),
                meta={"unit": unit, "role": role}))
    retrain = data.retrain_relearn
    for role, key, label, dash in (("retrain_relearn", "relearn_gap", "exact retrain after the attack", "dash"),
                                   ("retrain_before", "relearn_gap_before", "exact retrain before the attack", "dot")):
        value = retrain.get(key)
        if value is None or not math.isfinite(value):
            continue
        traces.append(dict(type="scatter", x=[-0.5, len(units) - 0.5], y=[value, value], mode="lines",
                           name=f"{label} ({value:+.3f})", line=dict(color="black", width=1.5, dash=dash),
                           hovertemplate=f"<b>{label}</b> (testbed): forget gap {value:+.4f}<extra></extra>",
                           meta={"role": role}))
    shapes = [dict(type="rect", xref="x domain", yref="y", x0=0, x1=1, y0=-tol, y1=tol, fillcolor=BAND_FILL,
                   line=dict(width=0), layer="below"),
              dict(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=0, y1=0,
                   line=dict(color="#2ca02c", width=1.2, dash="dot"))]
    notes = [dict(text=f"target band |gap| ≤ {tol:g}", x=1, y=tol, xref="x domain", yref="y", xanchor="right",
                  yanchor="bottom", showarrow=False, font=dict(size=11))]
    counts = {u: sum(c["row"]["unit"] == u for c in cands) for u in units}
    layout = dict(shapes=shapes, annotations=notes, legend=dict(orientation="v", x=1.01, y=1, font=dict(size=11)),
                  xaxis=dict(tickmode="array", tickvals=list(range(len(units))),
                             ticktext=[f"{esc(u)} ({counts[u]} checked)" for u in units],
                             range=[-0.5, len(units) - 0.5], showgrid=False, zeroline=False,
                             title=_title("search unit (each checked candidate: its points on one vertical line)")),
                  yaxis=dict(zeroline=False, title=_title("forget gap (below the band: the forget set came back)")))
    return figure(traces, layout, title, 480)


# ---- 4. Hypervolume, parallel coordinates -----------------------------------------------------------------------

def hypervolume_reference(data: StudyData) -> list[float]:
    """1.1 × the worst finite value of each objective over the whole study (one point for every unit)."""
    pts = [p for r in data.rows if (p := objective_point(r, data.objectives)) is not None]
    if not pts:
        return [1.0] * len(data.objectives)
    return [max(1e-9, 1.1 * max(col)) for col in zip(*pts, strict=True)]


def hypervolume_history(data: StudyData) -> go.Figure:
    ref = hypervolume_reference(data)
    names = {"forget_gap": "|forget gap|", "utility_drop": "utility drop", "mia_auc": "|MIA AUC − 0.5|"}
    ref_text = ", ".join(f"{names.get(o, o)} {v:.3g}" for o, v in zip(data.objectives, ref, strict=True))
    title = f"Hypervolume history per method (minimised objectives; reference point: {esc(ref_text)})"
    traces = []
    for unit in data.units.values():
        rows = sorted((r for r in unit.rows if r["status"] not in ("running", "interrupted")), key=lambda r: r["number"])
        if not rows:
            continue
        hv = hypervolume.history([objective_point(r, data.objectives) for r in rows], ref)
        traces.append(dict(type="scatter", x=[r["number"] for r in rows], y=hv, mode="lines+markers",
                           name=esc(unit.name), meta={"unit": unit.name},
                           line=dict(color=method_colour(unit.method), dash=SOURCE_DASH.get(unit.retain_source)),
                           marker=dict(symbol=SOURCE_SYMBOL.get(unit.retain_source, "square")),
                           hovertemplate=esc(unit.name) + "<br>trial %{x}<br>hypervolume %{y:.4g}<extra></extra>"))
    if not traces:
        return _empty(title, "no finished trials yet")
    layout = dict(xaxis=dict(title=_title("trial number (within the method's search)"),
                             dtick=1 if len(data.rows) < 60 else None),
                  yaxis=dict(title=_title("dominated hypervolume")))
    return figure(traces, layout, title, 420)


def parallel(data: StudyData) -> go.Figure:
    """Hyperparameters to objectives, one line per finished trial with metrics, coloured by outcome.

    Drawn with SVG lines on normalised axes rather than `go.Parcoords`: Parcoords needs WebGL, which costs
    more than a second per page in a browser without a GPU (headless, remote desktops). The hover points sit
    on the forget-gap axis; the trial table filters what Parcoords' brushing would."""
    rows = [r for r in data.rows if plotted(r) and r["params"].get(LR.name)]
    title = "Parallel coordinates: hyperparameters → objectives (colour: outcome)"
    if not rows:
        return _empty(title, "no finished trials with metrics yet")
    units = [u for u in data.units if any(r["unit"] == u for r in rows)]
    dims: list[tuple[str, list[float | None], Any]] = [
        ("unit", [units.index(r["unit"]) for r in rows], [(i, esc(u)) for i, u in enumerate(units)])]
    # one axis per declared hyperparameter the plotted trials carry (on its declared scale); a trial whose
    # method does not declare it sits under the axis, at "none"
    shown = [data.units[u] for u in units]
    axes = study_axes(shown)
    labels = [hp.label for hp in axes]
    for hp in axes:
        owners = [u.method for u in shown if hp in u.hyperparameters]
        label = hp.label if labels.count(hp.label) == 1 else f"{hp.label} ({', '.join(dict.fromkeys(owners))})"
        values = [data.units[r["unit"]].value(r, hp) for r in rows]
        dims.append((esc(label), [None if v is None or (hp.log and v <= 0) else hp.coordinate(v) for v in values],
                     "log" if hp.log else None))
    dims += [("forget gap", [r["metrics"]["forget_gap"] for r in rows], None),
             ("utility drop", [r["metrics"]["utility_drop"] for r in rows], None)]
    if any(r["metrics"].get("mia_auc") is not None for r in rows):
        dims.append(("MIA AUC", [r["metrics"].get("mia_auc") for r in rows], None))
    scaled, annotations, shapes = [], [], []
    for k, (label, values, ticks) in enumerate(dims):
        known = [v for v in values if v is not None]
        lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
        span = (hi - lo) or 1.0
        # a missing value (a hyperparameter this method does not take) sits just under the axis, labelled "none"
        scaled.append([(v - lo) / span if v is not None else -0.08 for v in values])
        shapes.append(dict(type="line", x0=k, x1=k, y0=0, y1=1, xref="x", yref="y", line=dict(color="#444", width=1)))
        annotations.append(dict(x=k, y=1.06, text=f"<b>{label}</b>", showarrow=False, xref="x", yref="y",
                                font=dict(size=12)))
        if isinstance(ticks, list):
            labels = [((v - lo) / span, t) for v, t in ticks]
        else:
            labels = [(i / 2, lo + span * i / 2) for i in range(3)] if hi > lo else [(0.0, lo)]
            labels = [(y, f"{10 ** v:.2g}" if ticks == "log" else f"{v:.3g}") for y, v in labels]
        if any(v is None for v in values):
            labels.append((-0.08, "none"))
        annotations += [dict(x=k, y=y, text=t, showarrow=False, xref="x", yref="y", xanchor="right", xshift=-4,
                             font=dict(size=9, color="#555")) for y, t in labels]
    gap_axis = [d[0] for d in dims].index("forget gap")
    traces = []
    for cls in ("remembered", "in_band", "in_band_damaged", "over_unlearned"):
        idx = [i for i, r in enumerate(rows) if r["map_class"] == cls]
        if not idx:
            continue
        xs: list[float | None] = []
        ys: list[float | None] = []
        for i in idx:
            xs += [*range(len(dims)), None]
            ys += [*(col[i] for col in scaled), None]
        colour = OUTCOME_COLOURS[cls]
        traces.append(dict(type="scatter", x=xs, y=ys, mode="lines", name=OUTCOME_LABELS[cls], legendgroup=cls,
                           line=dict(color=colour, width=1.2), opacity=0.55, hoverinfo="skip",
                           meta={"role": "lines", "class": cls}))
        traces.append(dict(type="scatter", x=[gap_axis] * len(idx), y=[scaled[gap_axis][i] for i in idx],
                           mode="markers", legendgroup=cls, showlegend=False, marker=dict(color=colour, size=6),
                           hovertext=[hover_short(rows[i]) for i in idx], hovertemplate="%{hovertext}<extra></extra>",
                           meta={"role": "hover", "class": cls}))
    layout = dict(shapes=shapes, annotations=annotations,
                  xaxis=dict(visible=False, range=[-0.6, len(dims) - 0.4]), yaxis=dict(visible=False, range=[-0.14, 1.1]),
                  legend=dict(orientation="h", y=-0.02, yanchor="top", x=0))
    return figure(traces, layout, title, 470, margin=dict(l=60, r=20, t=60, b=20))


# ---- 6. Efficiency ----------------------------------------------------------------------------------------------

def efficiency_figure(data: StudyData) -> go.Figure:
    eff = efficiency(data)
    title = "Efficiency: device-seconds and tokens per trial and in total, against retraining"
    if not eff["rows"]:
        return _empty(title, "no finished trials yet")
    traces: list[dict] = []
    for unit in data.units.values():
        rs = [r for r in eff["rows"] if r["unit"] == unit.name]
        if rs:
            traces.append(dict(type="scatter", x=[tokens(r) for r in rs], y=[device_seconds(r) for r in rs],
                               mode="markers", name=esc(unit.name), xaxis="x", yaxis="y",
                               marker=dict(color=method_colour(unit.method), size=8,
                                           symbol=SOURCE_SYMBOL.get(unit.retain_source, "square")),
                               hovertext=[hover_short(r, cost=True) for r in rs],
                               hovertemplate="%{hovertext}<extra></extra>"))
    labels = ["median trial", "study total", "retraining (≥)"]
    secs = [eff["median_trial_s"], eff["total_device_s"], eff["retrain_device_s"]]
    toks = [eff["median_trial_tokens"], eff["total_tokens"], eff["retrain_tokens"]]
    colours = ["#9ecae1", "#3182bd", "#636363"]
    for n, values, unit in ((2, secs, "s"), (3, toks, "tokens")):
        traces.append(dict(type="bar", x=labels, y=[v or 0 for v in values], marker=dict(color=colours),
                           showlegend=False, xaxis=f"x{n}", yaxis=f"y{n}", textposition="outside", cliponaxis=False,
                           text=[_si(v) + ("" if unit == "tokens" else " s") if v else "–" for v in values],
                           hovertemplate="%{x}: %{y:,.0f} " + unit + "<extra></extra>"))
    panel = dict(xref="paper", yref="paper", y=1.0, yanchor="bottom", showarrow=False, font=dict(size=13))
    notes = [dict(text="per trial", x=0.24, **panel), dict(text="device-seconds (log)", x=0.665, **panel),
             dict(text="tokens (log)", x=0.915, **panel),
             dict(text="retraining: " + esc(eff["retrain_basis"]), x=0, y=-0.3, xref="paper", yref="paper",
                  showarrow=False, xanchor="left", font=dict(size=10, color="#555"))]
    layout = dict(annotations=notes,
                  xaxis=dict(domain=[0, 0.48], anchor="y", title=_title("tokens processed (train + eval)")),
                  yaxis=dict(domain=[0, 1], anchor="x", title=_title("device-seconds")),
                  xaxis2=dict(domain=[0.57, 0.76], anchor="y2"), yaxis2=dict(anchor="x2", type="log", dtick=1),
                  xaxis3=dict(domain=[0.82, 1], anchor="y3"), yaxis3=dict(anchor="x3", type="log", dtick=1),
                  legend=dict(font=dict(size=11)))
    return figure(traces, layout, title, 440, margin=dict(l=70, r=20, t=80, b=110))


def _si(value: float | None) -> str:
    if value is None:
        return "–"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


# ---- everything of one study ------------------------------------------------------------------------------------

FIGURES = (
    ("fig-pareto", "Pareto front", "pareto"),
    ("fig-robustness", "Robustness map", "robustness"),
    ("fig-attacks", "Robustness under attack", "attacks"),
    ("fig-curves", "Unlearning curves", "curves"),
    ("fig-hypervolume", "Hypervolume history", "hypervolume"),
    ("fig-parallel", "Parallel coordinates", "parallel"),
    ("fig-efficiency", "Efficiency", "efficiency"),
)


def all_figures(data: StudyData, abs_gap: bool = False, curve_trials: list[int] | None = None) -> dict[str, go.Figure]:
    """Every figure of the study page, keyed by the element id it is shown under."""
    return {"fig-pareto": pareto(data, abs_gap), "fig-robustness": robustness(data), "fig-attacks": attacks(data),
            "fig-curves": curves(data, curve_trials), "fig-hypervolume": hypervolume_history(data),
            "fig-parallel": parallel(data), "fig-efficiency": efficiency_figure(data)}
