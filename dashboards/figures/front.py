"""The Pareto view: the front across methods, the hypervolume history and parallel coordinates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from dashboards import hypervolume
from dashboards.data import (
    OUTCOME_LABELS,
    StudyData,
    fmt,
    objective_point,
    plotted,
    study_axes,
)
from dashboards.figures.style import (
    BAND_FILL,
    OUTCOME_COLOURS,
    SOURCE_DASH,
    SOURCE_SYMBOL,
    axis_title,
    empty,
    esc,
    figure,
    hover,
    hover_short,
    method_colour,
)
from tuner.core.hparams import LR
from tuner.core.metrics import PARETO_X, leak_reference_text
from tuner.core.metrics import get as metric
from tuner.core.status import UNFINISHED

# ---- Pareto front -------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class XAxis:
    """What the Pareto figure's x axis shows: its figure per row, title, target band and target line."""

    key: str  # "signed", "abs" or a metric name
    name: str
    title: str
    fmt: str
    band: tuple[float, float] | None
    band_text: str
    target: float | None

    def value(self, row: dict[str, Any]) -> float | None:
        v = (row.get("metrics") or {}).get("forget_gap" if self.key in ("signed", "abs") else self.key)
        return None if v is None else abs(v) if self.key == "abs" else v


def x_options(data: StudyData) -> list[tuple[str, str]]:
    """(value, label) of the x axes the study can draw: the forget gap, and each forget-side metric a trial
    measured."""
    out = [("signed", "forget gap (signed)"), ("abs", "|forget gap|")]
    return out + [(k, metric(k).label) for k in PARETO_X if any(r["metrics"].get(k) is not None for r in data.rows)]


def x_axis(data: StudyData, key: str) -> XAxis:
    """The x axis `key` with its band (the metric's ideal ± the target's tolerance) and target line (the ideal;
    for memorisation, the exact retrain's value where the study has one)."""
    t = data.target
    if key in ("signed", "abs"):
        tol = t["gap_tolerance"]
        name = "|forget gap|" if key == "abs" else "forget gap"
        return XAxis(key, name, name + " = NLL(forget) − NLL(unseen)  (< 0 remembered, > 0 over-unlearned)",
                     "+.4f", (0.0 if key == "abs" else -tol, tol), f"target band |gap| ≤ {tol:g}", 0.0)
    spec = metric(key)
    tol = t.get(spec.tolerance) if spec.tolerance else None
    band = (spec.ideal - tol, spec.ideal + tol) if spec.ideal is not None and tol is not None else None
    target = spec.ideal if spec.ideal is not None else (data.exact_retrain or {}).get(key)
    title = f"{spec.label}  ({spec.unlearned})"
    if key == "privleak":
        title += "; relative to " + leak_reference_text(data.exact_retrain)
    return XAxis(key, spec.label, title, spec.fmt, band,
                 f"target band |{spec.label} − {spec.ideal:g}| ≤ {tol:g}" if band is not None else "", target)


def pareto(data: StudyData, x: str = "signed") -> go.Figure:
    """The x-axis figure (`x`: "signed" or "abs" forget gap, or a forget-side metric of `PARETO_X`) against
    utility drop, one colour per method (symbol and dash per retain source); each unit's Pareto front (over the
    study's own objectives) as a line, dominated trials faded, the target band, the utility tolerance and each
    unit's recommended point. A trial without the x figure is not drawn, and the figure says how many. Traces
    carry `meta` = {unit, role} for tests."""
    axis = x_axis(data, x)
    title = f"Pareto front across methods: {axis.name} against utility drop"
    util_tol = data.target["utility_tolerance"]
    shapes, notes = [], []
    if axis.band is not None:
        shapes.append(dict(type="rect", xref="x", yref="y domain", x0=axis.band[0], x1=axis.band[1], y0=0, y1=1,
                           fillcolor=BAND_FILL, line=dict(width=0), layer="below"))
        notes.append(dict(text=axis.band_text, x=axis.band[0], y=1, xref="x", yref="y domain", xanchor="left",
                          yanchor="top", showarrow=False, font=dict(size=11)))
    if axis.target is not None:
        shapes.append(dict(type="line", xref="x", yref="y domain", x0=axis.target, x1=axis.target, y0=0, y1=1,
                           line=dict(color="#2ca02c", width=1.5, dash="dot")))
    shapes.append(dict(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=util_tol, y1=util_tol,
                       line=dict(color="#d62728", width=1.2, dash="dash")))
    notes.append(dict(text=f"utility tolerance {util_tol:g}", x=1, y=util_tol, xref="x domain", yref="y",
                      xanchor="right", yanchor="bottom", showarrow=False, font=dict(size=11)))
    unmeasured = sum(1 for r in data.rows if plotted(r) and axis.value(r) is None)
    if unmeasured:
        notes.append(dict(text=f"{unmeasured} finished trial(s) without a {axis.name} figure are not drawn", x=0,
                          y=-0.12, xref="x domain", yref="y domain", xanchor="left", showarrow=False,
                          font=dict(size=11)))

    def drawn(row: dict[str, Any]) -> bool:
        return plotted(row) and axis.value(row) is not None

    def xval(row: dict[str, Any]) -> float:
        return axis.value(row)

    rec_ids = data.recommended_ids()
    overall = data.overall_id()
    traces: list[dict] = []
    shown_star = False
    for unit in data.units.values():
        rows = [r for r in unit.rows if drawn(r)]
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
        pick = (data.recommendation or {}).get("units", {}).get(unit.name, {})
        if rec is not None and drawn(picked(rec, pick)):
            status = pick.get("status", "")
            traces.append(dict(
                type="scatter", x=[xval(picked(rec, pick))], y=[picked(rec, pick)["metrics"]["utility_drop"]],
                mode="markers", name="recommended per method (★; hollow: closest, none in band)",
                showlegend=not shown_star, legendgroup="recommended",
                hovertext=["<b>recommended</b> (" + esc(status) + f") at step {fmt(pick.get('step'), 'd')}, "
                           f"measured {esc(pick.get('measured', 'full'))}<br>" + hover(picked(rec, pick))],
                hovertemplate="%{hovertext}<extra></extra>", customdata=[rec["id"]],
                marker=dict(symbol="star" if status == "recommended" else "star-open",
                            size=20 if rec["id"] == overall else 16, color=colour,
                            line=dict(color="black", width=1.5)),
                meta={"unit": unit.name, "role": "recommended"}))
            shown_star = True
    traces += _references(data, axis)
    r = data.row(overall)
    if r is not None:
        r = picked(r, (data.recommendation or {}).get("overall") or {})
    if r is not None and drawn(r):
        notes.append(dict(x=xval(r), y=r["metrics"]["utility_drop"], text="overall pick: " + esc(r["unit"]),
                          showarrow=True, arrowhead=2, ax=40, ay=-40, font=dict(size=11)))
    layout = dict(shapes=shapes, annotations=notes, legend=dict(orientation="v", x=1.01, y=1, font=dict(size=11)),
                  xaxis=dict(title=axis_title(axis.title), zeroline=False),
                  yaxis=dict(title=axis_title("utility drop (retain NLL − original, nats)")))
    return figure(traces, layout, title, 560)


def picked(row: dict[str, Any], pick: dict[str, Any]) -> dict[str, Any]:
    """The trial row with the figures of the recommended candidate (its step may be a mid-run checkpoint,
    measured in full by a confirmation), so the star sits where the recommendation is, not where the trial
    ended."""
    if not pick or pick.get("selected", True) or not pick.get("metrics"):
        return row
    return {**row, "metrics": {**pick["metrics"]}}


def _references(data: StudyData, axis: XAxis) -> list[dict]:
    """The original model (before unlearning) and, on the testbed, the exact-retrain model as reference points."""
    base = data.baseline or {}
    out = []
    for label, ref, symbol in (("original model", base, "x"), ("exact retrain (testbed)", data.exact_retrain, "cross")):
        if not ref or axis.value({"metrics": ref}) is None:
            continue
        drop = ref.get("retain_nll", 0.0) - base.get("retain_nll", ref.get("retain_nll", 0.0))
        value = axis.value({"metrics": ref})
        out.append(dict(type="scatter", x=[value], y=[drop], mode="markers", name=label,
                        marker=dict(symbol=symbol, size=12, color="black"),
                        hovertemplate=f"<b>{label}</b><br>{esc(axis.name)} {value:{axis.fmt}}<br>utility drop "
                                      f"{drop:+.4f}<extra></extra>", meta={"role": "reference"}))
    return out


# ---- Hypervolume, parallel coordinates -----------------------------------------------------------------------

def hypervolume_reference(data: StudyData) -> list[float]:
    """1.1 × the worst finite value of each objective over the whole study (one point for every unit)."""
    pts = [p for r in data.rows if (p := objective_point(r, data.objectives)) is not None]
    if not pts:
        return [1.0] * len(data.objectives)
    return [max(1e-9, 1.1 * max(col)) for col in zip(*pts, strict=True)]


def hypervolume_history(data: StudyData) -> go.Figure:
    ref = hypervolume_reference(data)
    names = {"forget_gap": "|forget gap|", "utility_drop": "utility drop", "mia_auc": "|MIA AUC − 0.5|",
             "privleak": "|privleak|"}
    ref_text = ", ".join(f"{names.get(o, o)} {v:.3g}" for o, v in zip(data.objectives, ref, strict=True))
    title = f"Hypervolume history per method (minimised objectives; reference point: {esc(ref_text)})"
    traces = []
    for unit in data.units.values():
        rows = sorted((r for r in unit.rows if r["status"] not in UNFINISHED), key=lambda r: r["number"])
        if not rows:
            continue
        hv = hypervolume.history([objective_point(r, data.objectives) for r in rows], ref)
        traces.append(dict(type="scatter", x=[r["number"] for r in rows], y=hv, mode="lines+markers",
                           name=esc(unit.name), meta={"unit": unit.name},
                           line=dict(color=method_colour(unit.method), dash=SOURCE_DASH.get(unit.retain_source)),
                           marker=dict(symbol=SOURCE_SYMBOL.get(unit.retain_source, "square")),
                           hovertemplate=esc(unit.name) + "<br>trial %{x}<br>hypervolume %{y:.4g}<extra></extra>"))
    if not traces:
        return empty(title, "no finished trials yet")
    layout = dict(xaxis=dict(title=axis_title("trial number (within the method's search)"),
                             dtick=1 if len(data.rows) < 60 else None),
                  yaxis=dict(title=axis_title("dominated hypervolume")))
    return figure(traces, layout, title, 420)


def parallel(data: StudyData) -> go.Figure:
    """Hyperparameters to objectives, one line per finished trial with metrics, coloured by outcome.

    Drawn with SVG lines on normalised axes rather than `go.Parcoords`: Parcoords needs WebGL, which costs
    more than a second per page in a browser without a GPU (headless, remote desktops). The hover points sit
    on the forget-gap axis; the trial table filters what Parcoords' brushing would."""
    rows = [r for r in data.rows if plotted(r) and r["params"].get(LR.name)]
    title = "Parallel coordinates: hyperparameters → objectives (colour: outcome)"
    if not rows:
        return empty(title, "no finished trials with metrics yet")
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
    for key, label in (("mia_auc", "MIA AUC"), ("privleak", "privleak %")):
        if any(r["metrics"].get(key) is not None for r in rows):
            dims.append((label, [r["metrics"].get(key) for r in rows], None))
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
