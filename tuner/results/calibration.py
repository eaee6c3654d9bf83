"""What a learning-rate calibration found: from the stored curve of one run whose lr rose geometrically over the
declared range (`tuner.study.calibration`), the lr at which the forget gap starts to move, the lr at which it
reaches the target band and the lr at which the utility collapses; and the lr window a unit's search draws from.

A pure function of the stored points, so the study driver, `tuner study show` and the dashboards all read the
same answer. Only measured figures count: a point whose utility was not scored is not a point where the utility
held.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

NOISE_POINTS = 2  # evaluated points after step 0 (the lowest lrs of the ramp) whose spread is the gap's noise
NOISE_FACTOR = 3.0  # a move is a rise of more than this many times that spread ...
MIN_MOVE = 0.02  # ... and of at least this many nats ...
MAX_MOVE_SHARE = 0.25  # ... but of at most this share of the way from the starting gap to the band
# A guideline point's trial sums this multiple of the lr the ramp summed up to the approximate-retraining point
# (see guideline). Constant-rate ga_gd trials at the default retain weight (linear schedule, 1 to 3 epochs):
# at 1.0 times (micro testbed) none reached it; at 1.34 times (small) only the 3-epoch one did, at its horizon,
# the others were stopped as hopeless; from 1.6 times (micro) and 2.15 times (small) every one reached it
# before its horizon. The ramp spends its largest rates last, where a gradient-ascent step moves the gap most.
GUIDELINE_SHARE = 2.0


@dataclass(frozen=True)
class Finding:
    """The calibration's reading. `low`/`high`: the lr window (None when there is none, and then `refusal` says
    why in one line). `threshold`: the rise of the forget gap that counted as a move."""

    range_low: float
    range_high: float
    threshold: float | None
    move_lr: float | None
    cross_lr: float | None
    collapse_lr: float | None
    low: float | None
    high: float | None
    refusal: str | None
    top_lr: float | None  # the highest lr the run reached
    target_lr_sum: float | None = None  # the ramp's lr summed over its steps up to where its gap reached 0

    @property
    def found(self) -> bool:
        return self.refusal is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the window and the three lrs, or why there is no window."""
        if self.refusal is not None:
            return self.refusal
        return (f"lr window {lr_text(self.low)}..{lr_text(self.high)} of {lr_text(self.range_low)}.."
                f"{lr_text(self.range_high)}: forget gap moved at {lr_text(self.move_lr)}, reached the band at "
                f"{lr_text(self.cross_lr)}, utility collapsed at {lr_text(self.collapse_lr)}")


def lr_text(lr: float | None) -> str:
    return "never" if lr is None else f"{lr:.2e}"


def _measured(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def move_threshold(gaps: list[float], gap_tolerance: float) -> float:
    """The rise of the forget gap that counts as a move: NOISE_FACTOR × the spread of the gap over step 0 and
    the first NOISE_POINTS evaluated points (the lowest lrs), at least MIN_MOVE, and at most MAX_MOVE_SHARE of
    the way from the starting gap to the band (so a move is always seen before the band is reached)."""
    first = gaps[:1 + NOISE_POINTS]
    threshold = max(MIN_MOVE, NOISE_FACTOR * (max(first) - min(first)))
    distance = -gap_tolerance - gaps[0]
    return min(threshold, MAX_MOVE_SHARE * distance) if distance > 0 else threshold


def _collapse(ramp: list[dict[str, Any]], utility_tolerance: float) -> int | None:
    """The index of the first point of the ramp's last run of measured utility drops past the tolerance (no
    measured point after it is within the tolerance); None when the last measured point is within it."""
    collapsed = None
    for k in reversed(range(len(ramp))):
        drop = ramp[k].get("utility_drop")
        if not _measured(drop):
            continue
        if drop <= utility_tolerance:
            break
        collapsed = k
    return collapsed


def guideline(finding: Finding, schedule_sums: Mapping[int, float]) -> list[tuple[int, float]]:
    """The brief's guideline points as (epochs, peak lr), longest first: for each horizon in `schedule_sums`
    (epochs -> the trial schedule's lr multipliers summed over its steps), the lr whose trial sums GUIDELINE_SHARE
    times the lr the ramp had summed when its forget gap reached the approximate-retraining point, where a trial
    stops. Along the success ridge a smaller rate needs more steps (guideline 4): with Adam each step moves the
    weights by about the lr, so the summed lr is what a run spends to get there. None without a window, or when
    the ramp's gap never reached 0."""
    if not finding.found or finding.target_lr_sum is None:
        return []
    return sorted(((e, GUIDELINE_SHARE * finding.target_lr_sum / total) for e, total in schedule_sums.items()
                   if total > 0), reverse=True)


def target_lr_sum(start: dict[str, Any], ramp: list[dict[str, Any]]) -> float | None:
    """The lr the ramp had summed when its forget gap reached 0: interpolated linearly in the gap between the
    first evaluated point at or past 0 and the point before it. None when the gap never reached 0 or the points
    carry no `lr_sum`."""
    before = {**start, "lr_sum": 0.0}
    if before["forget_gap"] >= 0:  # nothing left to unlearn: no lr reaches it
        return None
    for point in ramp:
        if point["forget_gap"] >= 0:
            if not (_measured(point.get("lr_sum")) and _measured(before.get("lr_sum"))):
                return None
            # the point before it is below 0 (the start is checked above): the rise is positive
            share = -before["forget_gap"] / (point["forget_gap"] - before["forget_gap"])
            return float(before["lr_sum"]) + share * (float(point["lr_sum"]) - float(before["lr_sum"]))
        before = point
    return None


def analyse(points: list[dict[str, Any]], low: float, high: float, gap_tolerance: float, utility_tolerance: float,
            diverged_lr: float | None = None) -> Finding:
    """The calibration's finding from its curve: `points` by step, the first at step 0 (before training), each
    later one with the `lr` of the step that led to it, `lr_sum` (the lr summed over the ramp's steps up to it,
    where the run recorded it), its `forget_gap` and, where it was scored, its
    `utility_drop` (against step 0). `low`/`high`: the declared lr range the ramp spanned; `diverged_lr`: the lr
    at which the run diverged, if it did (no utility is left after that: a collapse).

    Move: the first point whose gap rose above the starting gap by more than `move_threshold`. Crossing: the
    first point with gap >= -gap_tolerance. Collapse: the divergence, or the first point of the ramp's last run
    of measured utility drops past `utility_tolerance` (the utility never came back within it at a higher lr;
    a drop past it that a later measured point recovers from is not a collapse: the run was not wrecked there).
    The window runs from the lr of the last point before the move (the ramp's steps bracket where the gap starts to
    move; the range's low end when the first point moved) to the collapse lr, clamped to the declared range. Without
    a collapse it ends at the highest lr whose utility was measured within tolerance (the ramp's last point is
    always scored): an lr whose utility was not measured is not one where it held. A collapse before the move leaves
    no window."""
    start = points[0] if points and points[0].get("step") == 0 else None
    ramp = [p for p in points if p.get("step") and _measured(p.get("lr")) and _measured(p.get("forget_gap"))]
    top = max((float(p["lr"]) for p in points if p.get("step") and _measured(p.get("lr"))), default=None)
    if diverged_lr is not None:
        top = max(top or diverged_lr, diverged_lr)
    if start is None or not _measured(start.get("forget_gap")) or not ramp:
        return Finding(low, high, None, None, None, diverged_lr, None, None,
                       f"forget gap never measured along the ramp up to lr {lr_text(top or low)}", top)
    gaps = [float(start["forget_gap"]), *(float(p["forget_gap"]) for p in ramp)]
    threshold = move_threshold(gaps, gap_tolerance)
    moved = next((k for k, p in enumerate(ramp) if p["forget_gap"] - gaps[0] > threshold), None)
    crossed = next((p for p in ramp if p["forget_gap"] >= -gap_tolerance), None)
    collapsed = _collapse(ramp, utility_tolerance)
    collapse_lr = float(ramp[collapsed]["lr"]) if collapsed is not None else None
    if diverged_lr is not None and (collapse_lr is None or diverged_lr < collapse_lr):
        collapse_lr = float(diverged_lr)
    move_lr = float(ramp[moved]["lr"]) if moved is not None else None
    cross_lr = float(crossed["lr"]) if crossed is not None else None

    def finding(lo: float | None, hi: float | None, refusal: str | None) -> Finding:
        return Finding(low, high, threshold, move_lr, cross_lr, collapse_lr, lo, hi, refusal, top,
                       target_lr_sum(start, ramp))

    if move_lr is None:
        if collapse_lr is not None:
            return finding(None, None, f"utility collapsed at lr {lr_text(collapse_lr)} before the forget gap "
                                       f"moved (up to lr {lr_text(top)})")
        return finding(None, None, f"forget gap never moved up to lr {lr_text(top)}")
    if collapse_lr is not None and collapse_lr < move_lr:
        return finding(None, None, f"utility collapsed at lr {lr_text(collapse_lr)} before the forget gap moved "
                                   f"(at lr {lr_text(move_lr)})")
    lo = float(ramp[moved - 1]["lr"]) if moved > 0 else low
    held = [float(p["lr"]) for p in ramp if _measured(p.get("utility_drop")) and p["utility_drop"] <= utility_tolerance]
    hi = collapse_lr if collapse_lr is not None else max(held, default=None)
    if hi is None or hi < lo:
        return finding(None, None, f"utility not measured past lr {lr_text(max(held, default=None))}, below where "
                                   f"the forget gap moved (at lr {lr_text(move_lr)})" if held else
                       f"utility never measured along the ramp up to lr {lr_text(top)}")
    return finding(min(max(lo, low), high), min(max(hi, low), high), None)
