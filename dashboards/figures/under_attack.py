"""Robustness under attack: each checked candidate's forget gap before and after relearning and quantization."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

from dashboards.data import (
    StudyData,
    fmt,
)
from dashboards.figures.style import (
    BAND_FILL,
    axis_title,
    empty,
    esc,
    figure,
)
from tuner.engine.methods import describe

# ---- Robustness under attack ---------------------------------------------------------------------------------

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
        return empty(title, NO_CHECKS)
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
                             title=axis_title("search unit (each checked candidate: its points on one vertical line)")),
                  yaxis=dict(zeroline=False, title=axis_title("forget gap (below the band: the forget set came back)")))
    return figure(traces, layout, title, 480)
