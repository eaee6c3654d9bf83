"""The robustness map: per unit, the learning rate against each other hyperparameter, coloured by outcome,
with the success window shaded."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

from dashboards.data import (
    OUTCOME_LABELS,
    StudyData,
    Unit,
    ordered,
)
from dashboards.figures.style import (
    BAND_FILL,
    LOG_TICK_MANTISSAS,
    MAP_CLASSES,
    OUTCOME_COLOURS,
    axis_title,
    empty,
    esc,
    figure,
    hover_short,
)
from tuner.core.hparams import LR, Hyperparameter
from tuner.core.status import BROKEN

# ---- Robustness map ------------------------------------------------------------------------------------------

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
        return empty(title, "no trials yet")
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
            tickangle=0, title=axis_title(LR.label, 10))
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
                        symbol=["x" if r["map_class"] in BROKEN else "circle" for r in rs],
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
                                           symbol="x" if cls in BROKEN else "circle",
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
        return dict(type="linear", range=[-1, 1], showticklabels=False, title=axis_title("(learning rate only)", 10))
    axis: dict[str, Any] = dict(range=_axis_range(hp, values), title=axis_title(esc(hp.label), 10))
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
