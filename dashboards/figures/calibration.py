"""The learning-rate calibration of each search unit (`tuner.study.calibration`): the forget gap (top) and the
utility drop (bottom) against the lr of the range test, on a log axis, with the target band, the utility
tolerance, each unit's lr window shaded, the points where the gap moved, reached the band and the utility
collapsed marked, and the peak lr of each of the calibration's guideline points as a dotted line labelled with
its epochs (those inside the searched ranges are the unit's first trials; no gap is drawn there: a guideline
point's outcome is its trial's, not the ramp's). Only measured
figures are drawn: a point whose utility was not scored has no utility point."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from dashboards.data import StudyData
from dashboards.figures.style import BAND_FILL, SOURCE_DASH, axis_title, empty, esc, figure, method_colour

TITLE = "Learning-rate calibration: forget gap and utility drop against the lr of the range test"
FINDINGS = (("move_lr", "forget gap moved", "triangle-up", "forget_gap"),
            ("cross_lr", "reached the band", "star", "forget_gap"),
            ("collapse_lr", "utility collapsed", "x", "utility_drop"))


def calibration_series(record: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """The figure's data of one unit: (lrs, values) of every ramp point that measured the forget gap, and of
    every one that measured the utility drop (step 0, before training, has no lr and is left out)."""
    ramp = [p for p in record.get("points") or [] if p.get("step") and p.get("lr") is not None]
    out = {}
    for key in ("forget_gap", "utility_drop"):
        measured = [p for p in ramp if p.get(key) is not None]
        out[key] = ([p["lr"] for p in measured], [p[key] for p in measured])
    return out


def _fill(colour: str, alpha: float) -> str:
    r, g, b = (int(colour[k:k + 2], 16) for k in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def calibration(data: StudyData) -> go.Figure:
    units = [(u, r) for u, r in data.calibrations.items() if r.get("points")]
    if not units:
        return empty(TITLE, "no calibration stored: the study ran with calibration: false, or before calibrations")
    tol, util_tol = data.target["gap_tolerance"], data.target["utility_tolerance"]
    shapes = [dict(type="rect", xref="x domain", yref="y", x0=0, x1=1, y0=-tol, y1=tol, fillcolor=BAND_FILL,
                   line=dict(width=0), layer="below"),
              dict(type="line", xref="x2 domain", yref="y2", x0=0, x1=1, y0=util_tol, y1=util_tol,
                   line=dict(color="#d62728", dash="dash"))]
    notes = [dict(text=f"target band ±{tol:g}", x=1, y=tol, xref="x domain", yref="y", xanchor="right",
                  yanchor="bottom", showarrow=False, font=dict(size=10)),
             dict(text=f"utility tolerance {util_tol:g}", x=1, y=util_tol, xref="x2 domain", yref="y2",
                  xanchor="right", yanchor="bottom", showarrow=False, font=dict(size=10))]
    traces: list[dict] = []
    for unit, record in units:
        known = data.units.get(unit)
        colour = method_colour(known.method if known else unit.split("@")[0])
        dash = SOURCE_DASH.get(known.retain_source if known else None, "solid")
        window = record.get("window")
        label = esc(unit) + ("" if window else f" ({esc(record.get('status', ''))})")
        if window:
            shapes.append(dict(type="rect", xref="x", yref="paper", x0=window["low"], x1=window["high"], y0=0, y1=1,
                               fillcolor=_fill(colour, 0.1), line=dict(width=0), layer="below"))
        series = calibration_series(record)
        for key, axes, name in (("forget_gap", ("x", "y"), "forget gap"), ("utility_drop", ("x2", "y2"),
                                                                            "utility drop")):
            xs, ys = series[key]
            traces.append(dict(type="scatter", x=xs, y=ys, mode="lines+markers", name=f"{label}: {name}",
                               legendgroup=unit, showlegend=key == "forget_gap", xaxis=axes[0], yaxis=axes[1],
                               line=dict(color=colour, dash=dash, width=2), marker=dict(size=5),
                               meta={"unit": unit, "role": key},
                               hovertemplate=f"{esc(unit)}<br>lr %{{x:.2e}}<br>{name} %{{y:+.4f}}<extra></extra>"))
        traces += _findings(unit, record, series, colour)
        for point in record.get("guideline") or []:
            shapes.append(dict(type="line", xref="x", yref="y domain", x0=point["lr"], x1=point["lr"], y0=0, y1=1,
                               line=dict(color=colour, dash="dot", width=1)))
            notes.append(dict(text=f"{point['epochs']} ep", x=point["lr"], y=1, xref="x", yref="y domain",
                              yanchor="bottom", showarrow=False, font=dict(size=9, color=colour)))
    layout = dict(shapes=shapes, annotations=notes, legend=dict(font=dict(size=10)),
                  xaxis=dict(type="log", domain=[0, 1], anchor="y", matches="x2", showticklabels=False),
                  yaxis=dict(domain=[0.52, 1], anchor="x", title=axis_title("forget gap")),
                  xaxis2=dict(type="log", domain=[0, 1], anchor="y2", title=axis_title(
                      "learning rate of the range test (log; shaded: each unit's searched window)")),
                  yaxis2=dict(domain=[0, 0.44], anchor="x2", title=axis_title("utility drop (nats)")))
    return figure(traces, layout, TITLE, 560)


def _findings(unit: str, record: dict[str, Any], series: dict[str, tuple[list[float], list[float]]],
              colour: str) -> list[dict]:
    """Markers where the gap moved, reached the band and the utility collapsed (at a measured point only)."""
    finding = record.get("finding") or {}
    out = []
    for key, name, symbol, measured in FINDINGS:
        lr = finding.get(key)
        xs, ys = series[measured]
        if lr is None or lr not in xs:
            continue
        axes = ("x", "y") if measured == "forget_gap" else ("x2", "y2")
        out.append(dict(type="scatter", x=[lr], y=[ys[xs.index(lr)]], mode="markers", legendgroup=unit,
                        showlegend=False, xaxis=axes[0], yaxis=axes[1], meta={"unit": unit, "role": key},
                        marker=dict(symbol=symbol, size=13, color=colour, line=dict(width=1, color="black")),
                        hovertemplate=f"{esc(unit)}: {name} at lr %{{x:.2e}}<extra></extra>"))
    return out
