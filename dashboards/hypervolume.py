"""Exact hypervolume of minimised objectives (1, 2 or 3 of them) against a reference point.

The dashboards need it for a few hundred points at most, so clarity wins over speed: 2-D is a sweep,
3-D is a sum of 2-D slices along the third objective.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuner.results.pareto import dominates, pareto_indices


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Volume dominated by `points` and bounded by `ref` (points not strictly better than ref add nothing)."""
    pts = [tuple(p) for p in points if all(x < r for x, r in zip(p, ref, strict=True))]
    if not pts:
        return 0.0
    dim = len(ref)
    if dim == 1:
        return ref[0] - min(p[0] for p in pts)
    front = [pts[i] for i in pareto_indices(pts)]
    if dim == 2:
        return _hv2(front, ref)
    if dim == 3:
        return _hv3(front, ref)
    raise ValueError(f"hypervolume of {dim} objectives is not supported (1 to 3)")


def _hv2(points: list[tuple[float, ...]], ref: Sequence[float]) -> float:
    volume, best_y = 0.0, ref[1]
    for x, y in sorted(set((p[0], p[1]) for p in points)):
        if y < best_y:
            volume += (ref[0] - x) * (best_y - y)
            best_y = y
    return volume


def _hv3(points: list[tuple[float, ...]], ref: Sequence[float]) -> float:
    pts = sorted(points, key=lambda p: p[2])
    volume = 0.0
    for i, p in enumerate(pts):
        upper = pts[i + 1][2] if i + 1 < len(pts) else ref[2]
        if upper > p[2]:
            volume += _hv2([q[:2] for q in pts[: i + 1]], ref[:2]) * (upper - p[2])
    return volume


def history(points: Sequence[Sequence[float] | None], ref: Sequence[float]) -> list[float]:
    """Hypervolume after each trial in order (None: a trial without objective values adds nothing).

    Only the running front is kept: a point the front dominates leaves the volume unchanged."""
    front: list[tuple[float, ...]] = []
    volume = 0.0
    out = []
    for p in points:
        if p is not None:
            q = tuple(p)
            if not any(all(a <= b for a, b in zip(f, q, strict=True)) for f in front):
                # the front's points do not dominate each other, so only q can push one out
                front = [f for f in front if not dominates(q, f)] + [q]
                volume = hypervolume(front, ref)
        out.append(volume)
    return out
