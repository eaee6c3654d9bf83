"""Pareto dominance for minimised objectives (shared by the study summary, dashboards and recommender)."""

from __future__ import annotations

from collections.abc import Sequence

from tuner.core.status import SCORED


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def front_members(rows: Sequence[dict], objectives: Sequence[str]) -> dict[str, list[dict]]:
    """Per search unit, the rows (trials or candidates) on the Pareto front of the study's objectives; rows
    of unfinished trials or without every objective value take no part."""
    by_unit: dict[str, list[dict]] = {}
    for row in rows:
        values = [row["objectives"].get(o) for o in objectives]
        scored = row["status"] in SCORED and all(v is not None for v in values)
        by_unit.setdefault(row["unit"], []).extend([row] if scored else [])
    return {unit: [members[i] for i in pareto_indices([[r["objectives"][o] for o in objectives] for r in members])]
            for unit, members in by_unit.items()}


def front_ids(rows: Sequence[dict], objectives: Sequence[str]) -> dict[str, list[int]]:
    """Per search unit, the ids of the rows on its Pareto front."""
    return {unit: [r["id"] for r in members] for unit, members in front_members(rows, objectives).items()}
