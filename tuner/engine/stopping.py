"""Why a trial stops before its horizon, besides reaching the approximate-retraining point or diverging.

A trial's epochs are its horizon; every evaluated checkpoint is a candidate. Two rules end a trial early, each
a pure function of the curve stored so far (steps, forget gaps, utility figures), the horizon and the target's
tolerances, never of wall time: a resumed study, a re-run and a replay of a stored curve decide alike.

- `hopeless`: at its current pace the forget gap cannot reach the target band by the horizon
  (`stopped_hopeless`);
- `collapsed`: the utility drop passed the tolerance at two utility-measuring evaluations in a row
  (`stopped_collapsed`).

The stopped trial's kept checkpoint is measured in full like any other; the reason is stored with it.

Curve points are screening estimates (subsampled, with standard errors). No stop rests on one: a point whose
estimate would end the run, or whose gap is within CONFIRM_SE standard errors of the approximate-retraining
point, is scored again on every block, and the rules read that whole-set point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.core.status import STOPPED_COLLAPSED, STOPPED_HOPELESS

CONFIRM_SE = 2.0  # an estimated gap this many standard errors short of 0 may have reached it: score it whole
MIN_EVALUATIONS = 3  # k: the pace is fitted over the last k evaluations after step 0, and never on fewer
MIN_SHARE = 0.3  # no trial is judged hopeless before this share of its horizon
PACE_SAFETY = 2.0  # the projection assumes the trial speeds up to this multiple of its fitted pace
MARGIN = 1.0  # ... and must still miss the band by this many gap_tolerances


def is_estimate(point: Mapping[str, Any]) -> bool:
    """Whether a curve point holds a subsample estimate (a figure with its standard error)."""
    return any(key.endswith("_se") for key in point)


def reached(point: Mapping[str, Any], within_se: float = 0.0) -> bool:
    """Whether the point's forget gap reached the approximate-retraining point (forget NLL up to the unseen NLL),
    or, with `within_se`, may have: an estimate within that many of its standard errors of it."""
    return point["forget_gap"] + within_se * float(point.get("forget_gap_se") or 0.0) >= 0


def pace(steps: Sequence[float], gaps: Sequence[float]) -> tuple[float, float]:
    """(slope per step, intercept) of the least-squares line through the points."""
    n = len(steps)
    mean_s, mean_g = sum(steps) / n, sum(gaps) / n
    var = sum((s - mean_s) ** 2 for s in steps)
    slope = sum((s - mean_s) * (g - mean_g) for s, g in zip(steps, gaps, strict=True)) / var if var else 0.0
    return slope, mean_g - slope * mean_s


def hopeless(steps: Sequence[int], gaps: Sequence[float], horizon: int, gap_tolerance: float) -> str | None:
    """Why the trial cannot reach the band |forget gap| <= `gap_tolerance` by step `horizon`, or None.

    The rule, on the evaluations so far (step 0 and non-finite gaps left out):
    - never once a gap has reached -gap_tolerance (the trial reached the band, or passed it);
    - never before MIN_EVALUATIONS evaluations, nor before MIN_SHARE of the horizon, nor at the horizon;
    - the pace is the least-squares slope of the gap per step over the last MIN_EVALUATIONS evaluations;
    - the projection starts from the larger of the last gap and the fitted line's value at the last step, and
      goes on to the horizon at PACE_SAFETY times the pace (a falling pace counts as flat);
    - hopeless when that projection stays below -gap_tolerance by MARGIN gap_tolerances more.
    A curve that rises at a steady or slowing pace and reaches the band by the horizon is never hopeless:
    the fitted slope is then at least every later step's rise. A curve that speeds up by more than
    PACE_SAFETY times (after a plateau, say) can be stopped short of the band; its kept checkpoint is still a
    candidate. `bench/hopeless_replay.py` replays the rule on curves run to their horizon."""
    points = [(s, g) for s, g in zip(steps, gaps, strict=True) if s > 0 and math.isfinite(g)]
    if any(g >= -gap_tolerance for _, g in points):
        return None
    last = points[-1][0] if points else 0
    if len(points) < MIN_EVALUATIONS or last < MIN_SHARE * horizon or last >= horizon:
        return None
    window = points[-MIN_EVALUATIONS:]
    slope, intercept = pace([s for s, _ in window], [g for _, g in window])
    start = max(window[-1][1], intercept + slope * last)
    projected = start + PACE_SAFETY * max(slope, 0.0) * (horizon - last)
    if projected >= -gap_tolerance * (1.0 + MARGIN):
        return None
    return (f"hopeless at step {last}: the forget gap moved {slope:+.2e} per step over steps "
            f"{window[0][0]}-{last}; even at {PACE_SAFETY:g}x that pace it would be {projected:+.3f} at the "
            f"horizon (step {horizon}), short of the band's {-gap_tolerance:+g} by over {MARGIN * gap_tolerance:g}")


def utility_drop(point: Mapping[str, Any], start: Mapping[str, Any]) -> float | None:
    """A curve point's utility drop against the step-0 point (which scored the same blocks): retain NLL, else
    general NLL, as the final metrics take it; None where the point did not measure utility."""
    for name in ("retain_nll", "general_nll"):
        if point.get(name) is not None and start.get(name) is not None:
            return float(point[name]) - float(start[name])
    return None


def collapsed(curve: Sequence[Mapping[str, Any]], utility_tolerance: float) -> str | None:
    """Why the trial's utility collapsed, or None: the utility drop exceeded `utility_tolerance` at the last
    two evaluations that measured utility (a point that did not measure it is skipped, never read as within
    the tolerance or past it)."""
    if not curve:
        return None
    measured = [(p["step"], d) for p in curve[1:] if (d := utility_drop(p, curve[0])) is not None]
    recent = measured[-2:]
    if len(recent) < 2 or not all(math.isfinite(d) and d > utility_tolerance for _, d in recent):
        return None
    return (f"utility collapsed: utility drop {recent[0][1]:+.3f} at step {recent[0][0]} and {recent[1][1]:+.3f} "
            f"at step {recent[1][0]}, past the tolerance {utility_tolerance:g}")


@dataclass(frozen=True)
class Stop:
    status: str
    reason: str


@dataclass(frozen=True)
class StopRules:
    """The early stops of one run: a None tolerance turns its rule off."""

    horizon: int
    gap_tolerance: float | None = None  # the hopeless rule
    utility_tolerance: float | None = None  # the collapse rule

    def check(self, curve: Sequence[Mapping[str, Any]]) -> Stop | None:
        """The stop the curve so far calls for (the collapse first: it says more), or None; none at the horizon,
        where the run ends anyway."""
        if not curve or curve[-1]["step"] >= self.horizon:
            return None
        if self.utility_tolerance is not None and (why := collapsed(curve, self.utility_tolerance)):
            return Stop(STOPPED_COLLAPSED, why)
        if self.gap_tolerance is not None:
            points = [p for p in curve if p.get("forget_gap") is not None]
            why = hopeless([p["step"] for p in points], [p["forget_gap"] for p in points], self.horizon,
                           self.gap_tolerance)
            if why:
                return Stop(STOPPED_HOPELESS, why)
        return None
