"""Unlearning curves per trial, and the efficiency of the study against retraining."""

from __future__ import annotations

import plotly.graph_objects as go

from dashboards.data import (
    StudyData,
    device_seconds,
    efficiency,
    tokens,
)
from dashboards.figures.style import (
    BAND_FILL,
    SOURCE_SYMBOL,
    TRIAL_PALETTE,
    axis_title,
    empty,
    esc,
    figure,
    hover_short,
    method_colour,
)

# ---- Unlearning curves ---------------------------------------------------------------------------------------

def estimates(points: list[dict], key: str) -> dict:
    """Error bars (one standard error) and hover text for the points where `key` was estimated on a
    subsample; nothing extra where every point was scored whole."""
    errors = [p.get(f"{key}_se") for p in points]
    notes = [f" ± {se:.4f} (subsample estimate)" if se is not None else "" for se in errors]
    if all(se is None for se in errors):
        return {"customdata": notes}
    return {"customdata": notes,
            "error_y": dict(type="data", array=[se or 0.0 for se in errors], visible=True, thickness=1, width=2)}


def curves(data: StudyData, trial_ids: list[int] | None = None) -> go.Figure:
    """Forget, unseen and retain NLL against step (top) and the forget gap with the target band (bottom) for the
    chosen trials; stop points marked; on the testbed the exact-retrain forget NLL as a reference line."""
    ids = [t for t in (trial_ids if trial_ids is not None else data.default_curve_trials()) if t in data.curves]
    title = "Unlearning curves: forget / unseen / retain NLL and forget gap against step"
    if not ids:
        return empty(title, "no curve recorded for the chosen trials")
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
                               hovertemplate=f"{label}<br>step %{{x}}<br>{name} %{{y:.4f}}%{{customdata}}<extra></extra>",
                               **estimates(pts, key)))
        traces.append(dict(type="scatter", x=steps, y=[p.get("forget_gap") for p in pts], mode="lines+markers",
                           name=f"{label}: forget gap", legendgroup=str(tid), showlegend=False, xaxis="x2", yaxis="y2",
                           line=dict(color=colour, width=2), marker=dict(size=4),
                           meta={"trial": tid, "role": "forget_gap"},
                           hovertemplate=f"{label}<br>step %{{x}}<br>forget gap %{{y:+.4f}}%{{customdata}}<extra></extra>",
                           **estimates(pts, "forget_gap")))
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
                  yaxis=dict(domain=[0.41, 1], anchor="x", title=axis_title("NLL (nats/token)")),
                  xaxis2=dict(domain=[0, 1], anchor="y2", title=axis_title(
                      "optimiser step (dotted vertical: stopped at the target; ◇ kept checkpoint)")),
                  yaxis2=dict(domain=[0, 0.35], anchor="x2", title=axis_title("forget gap")))
    return figure(traces, layout, title, 620)


# ---- Efficiency ----------------------------------------------------------------------------------------------

def efficiency_figure(data: StudyData) -> go.Figure:
    eff = efficiency(data)
    title = "Efficiency: device-seconds and tokens per trial and in total, against retraining"
    if not eff["rows"]:
        return empty(title, "no finished trials yet")
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
                  xaxis=dict(domain=[0, 0.48], anchor="y", title=axis_title("tokens processed (train + eval)")),
                  yaxis=dict(domain=[0, 1], anchor="x", title=axis_title("device-seconds")),
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
