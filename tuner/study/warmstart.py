"""A warm start: an earlier study on the same store, of the same model family, tells a new study's samplers
what its finished trials found, before the new study runs its first trial.

Each finished trial of a search unit the two studies share becomes a prior: its setting, its objectives as the
new study scores them (its own objectives and target, from the stored metrics) and its constraints. A prior is
told to the unit's Optuna study through the public API a live trial goes through (`enqueue_trial`, `ask`,
`set_constraint`, `tell`), so every sampler (TPE, GP, NSGA-II, random) reads it as a finished trial. A prior
whose setting lies outside the new unit's ranges, or which lacks a figure one of the new objectives needs,
is left out: the sampler is never told a value that was not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tuner.core.errors import TunerError
from tuner.core.status import SCORED
from tuner.results.candidates import constraint_values, objective_values
from tuner.store import Store
from tuner.study.spec import Range, StudySpec


@dataclass(frozen=True)
class Prior:
    """One finished trial of the earlier study, as the new study's sampler is told it."""

    params: dict[str, Any]
    values: tuple[float, ...]
    constraints: dict[str, float]


def source_of(spec: StudySpec, store: Store, model: dict[str, Any] | None) -> str | None:
    """The study named by `spec.warm_start`, checked: it exists on this store and ran a model of the same
    family (`model_type`) as this study's `model` fingerprint. None without a warm start."""
    name = spec.warm_start
    if name is None:
        return None
    try:
        earlier = store.study(name)
    except TunerError:
        raise TunerError(f"warm_start: no study '{name}' on this store (tuner study list shows them)") from None
    theirs = ((earlier.data_summary or {}).get("model") or {}).get("model_type")
    ours = (model or {}).get("model_type")
    if theirs is None or theirs != ours:
        raise TunerError(f"warm_start: study '{name}' ran a {theirs or 'model of unknown'} model, this study a "
                         f"{ours} one: settings tuned on another model family do not transfer")
    return name


def priors(rows: list[dict[str, Any]], unit: str, ranges: dict[str, Range], objectives: list[str],
           rule: dict[str, Any]) -> tuple[list[Prior], int]:
    """The unit's priors among the warm start's trial `rows` (`Store.trials` of that study) and how many of its
    finished trials were left out (a setting outside `ranges`, or an objective not measured). `rule` is this
    study's target (`Target.rule`)."""
    out, skipped = [], 0
    for row in rows:
        if row["unit"] != unit or row["status"] not in SCORED or not row.get("metrics"):
            continue
        params = {k: v for k, v in (row.get("params") or {}).items() if k in ranges}
        values = objective_values(row["metrics"], objectives)
        inside = set(params) == set(ranges) and all(ranges[k].low <= v <= ranges[k].high for k, v in params.items())
        measured = len(values) == len(objectives) and all(math.isfinite(v) for v in values.values())
        if not (inside and measured):
            skipped += 1
            continue
        out.append(Prior(params, tuple(values[o] for o in objectives), constraint_values(row["metrics"], rule)))
    return out, skipped


def line(source: str, told: int, skipped: int) -> str:
    """What a unit's warm start did, in one line for the study's progress."""
    text = f"warm start: {told} finished trial(s) of study '{source}' told to the sampler"
    return text + (f", {skipped} left out (outside this search's ranges or not measured)" if skipped else "")
