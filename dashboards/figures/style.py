"""The figures' common look: colours per method and outcome, the layout template, escaping, hover labels."""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

from dashboards.data import (
    OUTCOME_LABELS,
    device_seconds,
    fmt,
    tokens,
)
from tuner.engine.methods import describe

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
    """A figure from plain trace and layout dicts, with the dashboards' title, size, template and font. Empty
    shape and annotation lists are left out, as plotly's validation would leave them out."""
    layout = {k: v for k, v in layout.items() if not (k in ("shapes", "annotations") and not v)}
    layout = {"xaxis": {}, "yaxis": {}, **layout,
              "title": dict(text=title, x=0.01, xanchor="left", y=1, yref="container", yanchor="top", pad=dict(t=12),
                            font=dict(size=15)), "height": height,
              "template": TEMPLATE, "font": FONT, "hoverlabel": dict(align="left"),
              "margin": margin or dict(l=70, r=20, t=70, b=55)}
    return go.Figure(data=traces, layout=layout, _validate=False)


def axis_title(text: str, size: int = 12) -> dict[str, Any]:
    return dict(text=text, font=dict(size=size))


def empty(title: str, message: str, height: int = 320) -> go.Figure:
    note = dict(text=esc(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                font=dict(size=14, color="#555"))
    return figure([], {"annotations": [note], "xaxis": dict(visible=False), "yaxis": dict(visible=False)},
                  title, height)


def estimate_note(row: dict[str, Any], metric: str) -> str:
    """' ± SE (subsample estimate)' after a figure the trial estimated on a subsample, else nothing."""
    if metric not in (row.get("estimated") or []):
        return ""
    se = (row.get("errors") or {}).get(metric)
    return f" ± {se:.4f} (subsample estimate)" if se is not None else " (subsample estimate)"


def hover(row: dict[str, Any]) -> str:
    """Hyperparameters and metrics of one trial, escaped, for a hover label."""
    m, res = row["metrics"], row["result"]
    lines = [f"<b>{esc(row['unit'])}</b> #{row['number']} (trial {row['id']})",
             f"{esc(row['status'])}: {esc(OUTCOME_LABELS.get(row['map_class'], row['map_class']))}",
             esc(describe(row.get("method"), row["params"])),
             f"forget gap {fmt(m.get('forget_gap'), '+.4f')}{estimate_note(row, 'forget_gap')}, "
             f"utility drop {fmt(m.get('utility_drop'), '+.4f')}{estimate_note(row, 'utility_drop')}",
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
        text += (f"<br>gap {m['forget_gap']:+.3f}{estimate_note(row, 'forget_gap')}, "
                 f"utility drop {fmt(m.get('utility_drop'), '+.3f')}{estimate_note(row, 'utility_drop')}")
    if cost:
        text += f"<br>{fmt(device_seconds(row), '.1f')} device-s, {tokens(row):,} tokens"
    if row.get("error"):
        text += "<br>error: " + esc(str(row["error"])[:120])
    return text
