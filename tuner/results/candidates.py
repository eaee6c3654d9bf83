"""Every evaluated checkpoint of a trial is a candidate: the trial's hyperparameters stopped at that step.

A trial evaluates a curve of points as it runs; each point with a forget gap is a setting a model owner can
ship (`tuner export --trial N --step S`, applied with `end_step`). The Pareto front and the recommender take
these candidates, not only each trial's selected checkpoint.

How a candidate's figures were measured (`measured`) travels with it, because a recommendation may only show
full measurements:
- "full": the trial's selected checkpoint, scored on every block of every set (MIA included);
- "confirmed": a mid-run checkpoint whose setting was re-run to its step and scored in full
  (`tuner.study.rechecks`); the curve point's figures it replaced are kept under `estimate`;
- "estimate": a curve point as the trial measured it: forget and unseen in full, retain and general only at
  some points and possibly on a subsample (`estimated` names those), no MIA;
- "unconfirmed": a confirmation re-run that produced no metrics (it diverged or failed).
A missing figure stays missing: it is never read as 0 or as within a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from tuner.core.metrics import get as metric_def
from tuner.core.status import SCORED
from tuner.engine.stopping import utility_drop

OK_STATUSES = SCORED  # a trial whose metrics may be ranked
CURVE_METRICS = ("forget_gap", "forget_nll", "unseen_nll", "retain_nll", "general_nll")


def objective(name: str, value: float) -> float:
    """What the sampler minimises for a metric (`tuner.core.metrics.Metric.objective`): the distance to the
    approximate-retraining point (|forget gap|, |MIA AUC - 0.5|, |privleak|), the utility drop."""
    return float(metric_def(name).objective(value))


def objective_values(metrics: dict[str, float] | None, objectives: Iterable[str]) -> dict[str, float]:
    """A trial's objectives by name, as its report tells them to the searcher; a trial without metrics
    (diverged) gets +inf on every objective. An objective the metrics do not hold is left out, never given a neutral value:
    the searcher then tells the trial as failed rather than as a measurement."""
    if not metrics:
        return {name: math.inf for name in objectives}
    return {name: objective(name, metrics[name]) for name in objectives if metrics.get(name) is not None}


def _measured_objectives(metrics: dict[str, float | None], objectives: Iterable[str]) -> dict[str, float]:
    """A mid-run checkpoint's objective values, only for what its curve point measured (no MIA there)."""
    return {name: objective(name, metrics[name]) for name in objectives
            if metrics.get(name) is not None and math.isfinite(metrics[name])}


CONFIRMATION = "confirmation"  # a check's `details` key: the re-run that scored a mid-run candidate in full
ESTIMABLE = (*CURVE_METRICS, "utility_drop")  # what a curve point may estimate on subsamples, each with `{k}_se`
UTILITY_ESTIMATES = ("retain_nll", "general_nll", "utility_drop")  # what curves stored without errors estimated


def confirmation(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """The confirmation record of a candidate's checks ({"status", "estimate", ...}), or None."""
    return ((check or {}).get("details") or {}).get(CONFIRMATION)


def curve_estimate(point: dict[str, Any], start: dict[str, Any] | None, subsampled: bool) -> dict[str, Any]:
    """A curve point's figures as the trial measured them, which of them are estimates (`estimated`), and
    the standard error of each estimate (`errors`): the utility drop is taken against the step-0 point.
    A subsampled curve's figures are those stored with an error; a curve stored before errors were (its
    forget and unseen scored whole) estimated its utility figures only."""
    metrics = {k: point.get(k) for k in CURVE_METRICS if point.get(k) is not None}
    drop = utility_drop(point, start) if start is not None else None
    if drop is not None:
        metrics["utility_drop"] = drop
    errors = {k: point[f"{k}_se"] for k in ESTIMABLE
              if subsampled and k in metrics and point.get(f"{k}_se") is not None}
    if not subsampled:
        estimated = []
    elif any(point.get(f"{k}_se") is not None for k in ESTIMABLE) or point.get("step") == 0:  # 0: scored whole
        estimated = list(errors)
    else:
        estimated = [k for k in UTILITY_ESTIMATES if k in metrics]
    return {"metrics": metrics, "estimated": estimated, "errors": errors}


def subsampled_curve(result: dict[str, Any] | None) -> bool:
    """Whether a trial's curve points scored utility on a subsample: as the run recorded it (`subsampled`),
    or, for results stored before runs recorded that, whenever the run asked for a subsample."""
    result = result or {}
    if "subsampled" in result:
        return bool(result["subsampled"])
    return (result.get("config") or {}).get("eval_utility_blocks") is not None


def candidates(rows: list[dict[str, Any]], curves: dict[int, list[dict[str, Any]]], objectives: list[str],
               checks: dict[tuple[int, int], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The study's candidates as rows like `Store.trials` gives (plus `step`, `selected`, `measured`): per
    finished trial its selected checkpoint (with the trial's own metrics) and every other evaluated step
    after 0, each with the metrics of its checks (`Store.study_checks`: robustness checks, and a
    confirmation's full measurement, which replaces the curve's figures). Trials that failed or diverged
    appear once, as themselves, so the recommender can say so."""
    checks = checks or {}
    out = []
    for row in rows:
        selected = (row.get("result") or {}).get("selected_step")
        checked = (checks.get((row["id"], selected)) or {}).get("metrics") or {}
        out.append({**row, "step": selected, "selected": True, "measured": "full",
                    "metrics": {**row["metrics"], **checked}})
        if row["status"] not in OK_STATUSES:
            continue
        points = curves.get(row["id"], [])
        start = next((p for p in points if p["step"] == 0), None)
        subsampled = subsampled_curve(row.get("result"))
        for point in points:
            if point["step"] in (0, selected) or point.get("forget_gap") is None:
                continue
            curve = curve_estimate(point, start, subsampled)
            check = checks.get((row["id"], point["step"])) or {}
            confirmed = confirmation(check)
            candidate = {**row, "step": point["step"], "selected": False}
            if confirmed is None:
                metrics = {**curve["metrics"], **(check.get("metrics") or {})}
                candidate.update(measured="estimate", estimated=curve["estimated"], errors=curve["errors"])
            elif confirmed.get("status") in OK_STATUSES:
                metrics = dict(check.get("metrics") or {})
                candidate.update(measured="confirmed", estimate=curve["metrics"])
            else:
                metrics = curve["metrics"]
                candidate.update(measured="unconfirmed", estimate=curve["metrics"],
                                 reason=confirmed.get("reason") or f"confirmation {confirmed.get('status')}")
            out.append({**candidate, "metrics": metrics, "objectives": _measured_objectives(metrics, objectives)})
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
    """The exact-retrain model's values the limits are measured from (its relearning attack, stored once, and
    its forget set's exact memorisation)."""
    relearn = (exact_retrain or {}).get("relearn") or {}
    out = {"relearn_gap": relearn["relearn_gap"]} if relearn.get("relearn_gap") is not None else {}
    if (exact_retrain or {}).get("forget_em") is not None:
        out["forget_em"] = exact_retrain["forget_em"]
    return out


def em_excess(metrics: dict[str, Any], target: dict[str, Any]) -> float | None:
    """How far a candidate's forget exact memorisation is above the target's plus `em_tolerance` (<= 0:
    within): the exact retrain's forget EM, else the candidate's own unseen EM (text never trained on). None
    when the target sets no such limit or a figure was not measured."""
    if target.get("em_tolerance") is None or metrics.get("forget_em") is None:
        return None
    base = (target.get(YARDSTICK) or {}).get("forget_em", metrics.get("unseen_em"))
    return None if base is None else float(metrics["forget_em"]) - float(base) - float(target["em_tolerance"])


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
    excess = em_excess(metrics, target)
    if excess is not None and excess > 0:
        out.append(f"forget exact memorisation {metrics['forget_em']:.3f} is {excess:.3f} above the target's "
                   f"+ em_tolerance {target['em_tolerance']:g}")
    return out


def constraint_values(metrics: dict[str, Any], target: dict[str, Any]) -> dict[str, float]:
    """Optuna's constraints by name (<= 0 is feasible): the utility drop within its tolerance (left out when
    it was not measured), and each robustness limit the target sets. An unchecked robustness value counts as
    feasible for the sampler (checks run only where they matter); the recommender never reads it so."""
    values = {}
    if metrics.get("utility_drop") is not None:
        values["utility_drop"] = float(metrics["utility_drop"]) - float(target["utility_tolerance"])
    for limit, metric, _ in LIMITS:
        if target.get(limit) is not None:
            value = metrics.get(metric)
            values[metric] = 0.0 if value is None else _bound(target, limit, metric) - float(value)
    if (excess := em_excess(metrics, target)) is not None:
        values["forget_em"] = excess
    return values
