"""The dashboards' figures: pure functions from `StudyData` to Plotly figures (no store, no Dash), one module
per view: `front` (Pareto front, hypervolume history, parallel coordinates), `robustness_map`, `under_attack`,
`training` (unlearning curves, efficiency), `calibration` (each unit's lr range test), with their common look
in `style`.

Every piece of stored text that reaches a figure (study names, units, errors) is HTML-escaped first:
Plotly renders a subset of HTML in titles and hover labels, and decodes the escaped entities back to text.

Figures are assembled as plain dicts (traces, shapes, annotations, axes with hand-set domains) and wrapped
without Plotly's per-property validation: for a 500-trial study that validation alone took longer than the
page's whole budget. `tests/test_dashboards.py` validates every figure once instead.
"""

from __future__ import annotations

import plotly.graph_objects as go

from dashboards.data import StudyData
from dashboards.figures.calibration import calibration
from dashboards.figures.front import hypervolume_history, hypervolume_reference, parallel, pareto
from dashboards.figures.robustness_map import robustness
from dashboards.figures.style import esc, figure, hover, hover_short, method_colour
from dashboards.figures.training import curves, efficiency_figure
from dashboards.figures.under_attack import ATTACK_KINDS, NO_CHECKS, attack_hover, attacks

__all__ = ["ATTACK_KINDS", "FIGURES", "NO_CHECKS", "all_figures", "attack_hover", "attacks", "calibration", "curves",
           "efficiency_figure", "esc", "figure", "hover", "hover_short", "hypervolume_history",
           "hypervolume_reference", "method_colour", "parallel", "pareto", "robustness"]

# (element id, heading, figure) of the study page, in page order
FIGURES = (
    ("fig-pareto", "Pareto front", "pareto"),
    ("fig-robustness", "Robustness map", "robustness"),
    ("fig-attacks", "Robustness under attack", "attacks"),
    ("fig-curves", "Unlearning curves", "curves"),
    ("fig-calibration", "Learning-rate calibration", "calibration"),
    ("fig-hypervolume", "Hypervolume history", "hypervolume"),
    ("fig-parallel", "Parallel coordinates", "parallel"),
    ("fig-efficiency", "Efficiency", "efficiency"),
)


def all_figures(data: StudyData, x: str = "signed", curve_trials: list[int] | None = None) -> dict[str, go.Figure]:
    """Every figure of the study page, keyed by the element id it is shown under; `x` is the Pareto figure's x
    axis (`tuner.dashboards.figures.front.x_options`)."""
    return {"fig-pareto": pareto(data, x), "fig-robustness": robustness(data), "fig-attacks": attacks(data),
            "fig-curves": curves(data, curve_trials), "fig-calibration": calibration(data),
            "fig-hypervolume": hypervolume_history(data),
            "fig-parallel": parallel(data), "fig-efficiency": efficiency_figure(data)}
