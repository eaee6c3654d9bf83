"""Every evaluated checkpoint of a trial is a candidate: the trial's hyperparameters stopped at that step.

A trial evaluates a curve of points as it runs; each point with a forget gap and a utility drop is a setting
a model owner can ship (`tuner export --trial N --step S`, applied with `end_step`). The Pareto front and
the recommender take these candidates, not only each trial's selected checkpoint. The selected checkpoint
carries the trial's full final metrics (MIA and every utility block); the other points carry what the curve
measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

OK_STATUSES = ("completed", "stopped_at_target")
CURVE_METRICS = ("forget_gap", "forget_nll", "unseen_nll", "retain_nll", "general_nll")


def objective(name: str, value: float) -> float:
    """What the sampler minimises for a metric: the distance to the approximate-retraining point (|forget
    gap|), the utility drop, the MIA AUC's distance from 0.5."""
    return float(abs(value) if name == "forget_gap" else abs(value - 0.5) if name == "mia_auc" else value)


def objective_values(metrics: dict[str, float] | None, objectives: Iterable[str]) -> dict[str, float]:
    """A trial's objectives as it reports them to Tune (`obj_` keys); a trial without metrics (diverged) gets
    +inf on every objective, one without an MIA or utility figure the neutral value."""
    if not metrics:
        return {f"obj_{name}": math.inf for name in objectives}
    neutral = {"utility_drop": 0.0, "mia_auc": 0.5}
    return {f"obj_{name}": objective(name, metrics.get(name, neutral.get(name))) for name in objectives}


def _measured_objectives(metrics: dict[str, float | None], objectives: Iterable[str]) -> dict[str, float]:
    """A mid-run checkpoint's objective values, only for what its curve point measured (no MIA there)."""
    return {name: objective(name, metrics[name]) for name in objectives
            if metrics.get(name) is not None and math.isfinite(metrics[name])}


def candidates(rows: list[dict[str, Any]], curves: dict[int, list[dict[str, Any]]], objectives: list[str],
               checks: dict[tuple[int, int], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The study's candidates as rows like `Store.trials` gives (plus `step` and `selected`): per finished
    trial its selected checkpoint (with the trial's own metrics) and every other evaluated step after 0,
    each with the metrics of its robustness checks (`Store.study_checks`). Trials that failed or diverged
    appear once, as themselves, so the recommender can say so."""
    checks = checks or {}
    out = []
    for row in rows:
        selected = (row.get("result") or {}).get("selected_step")
        checked = (checks.get((row["id"], selected)) or {}).get("metrics") or {}
        out.append({**row, "step": selected, "selected": True, "metrics": {**row["metrics"], **checked}})
        if row["status"] not in OK_STATUSES:
            continue
        points = curves.get(row["id"], [])
        start = next((p for p in points if p["step"] == 0), None)
        for point in points:
            if point["step"] in (0, selected) or point.get("forget_gap") is None:
                continue
            metrics = {k: point.get(k) for k in CURVE_METRICS if point.get(k) is not None}
            if start is not None and point.get("retain_nll") is not None and start.get("retain_nll") is not None:
                # against the step-0 point: both scored the same (possibly subsampled) retain blocks
                metrics["utility_drop"] = point["retain_nll"] - start["retain_nll"]
            metrics.update((checks.get((row["id"], point["step"])) or {}).get("metrics") or {})
            out.append({**row, "step": point["step"], "selected": False, "metrics": metrics,
                        "objectives": _measured_objectives(metrics, objectives)})
    return out


def key(candidate: dict[str, Any]) -> tuple[int, int | None]:
    return candidate["id"], candidate.get("step")


# A robustness limit of the spec's `target`, the checked metric it bounds from below and what failing it means.
# The bound is the exact-retrain model's value after the same check when the study has one (the testbed's
# `yardstick`: a model that never saw the forget set still learns some of it from the attack's half), else 0:
# the metric must stay >= yardstick - limit.
LIMITS = (("relearn_limit", "relearn_gap", "relearning brings the forget set back"),
          ("quant_limit", "quant4_gap", "4-bit quantization brings the forget set back"))
YARDSTICK = "yardstick"  # target key: {metric: the exact-retrain model's value after the same check}


def yardstick(exact_retrain: dict[str, Any] | None) -> dict[str, float]:
    """The exact-retrain model's values the limits are measured from (its relearning attack, stored once)."""
    relearn = (exact_retrain or {}).get("relearn") or {}
    return {"relearn_gap": relearn["relearn_gap"]} if relearn.get("relearn_gap") is not None else {}


def _bound(target: dict[str, Any], limit: str, metric: str) -> float:
    return float((target.get(YARDSTICK) or {}).get(metric, 0.0)) - float(target[limit])


def check_failures(metrics: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """Why a candidate fails the study's robustness limits (empty: it passes, or was not checked)."""
    out = []
    for limit, metric, meaning in LIMITS:
        value = metrics.get(metric)
        if target.get(limit) is not None and value is not None and value < _bound(target, limit, metric):
            base = (target.get(YARDSTICK) or {}).get(metric)
            where = f"{base:+.3f} (exact-retrain) - {target[limit]:g}" if base is not None else f"-{target[limit]:g}"
            out.append(f"{meaning}: {metric} {value:+.3f} < {where}")
    return out


CONSTRAINT_PREFIX = "constraint_"  # a trial's result carries each constraint under this prefix


def constraint_values(metrics: dict[str, Any], target: dict[str, Any]) -> dict[str, float]:
    """Optuna's constraints by name (<= 0 is feasible): the utility drop within its tolerance, and each
    robustness limit the target sets. An unchecked value counts as feasible (0): checks run where they matter."""
    values = {"utility_drop": float(metrics.get("utility_drop") or 0.0) - float(target["utility_tolerance"])}
    for limit, metric, _ in LIMITS:
        if target.get(limit) is not None:
            value = metrics.get(metric)
            values[metric] = 0.0 if value is None else _bound(target, limit, metric) - float(value)
    return values
