"""Recommendation: a defensible setting per method and overall, read from a study's stored trials.

Rule (its tolerances are data in the spec's `target`): a trial *succeeds* when its forget gap is within
`gap_tolerance` of 0 (and, for each objective with a band, `tuner.core.metrics.BAND`: its MIA AUC within
`mia_tolerance` of 0.5, its privleak within `privleak_tolerance` of 0), its forget exact memorisation is at
most the target's when `em_tolerance` is set, and its
utility drop within `utility_tolerance` (gap 0 reached by collapsing the model is no success). Among
successes, prefer *robust* ones — whose neighbours in the method's hyperparameter space (each declared knob
on its own scale, `tuner.core.hparams`) also succeed (guideline 5) — and then the smallest utility drop. With no
success, report the closest trial and why.

It ranks candidates (`tuner.results.candidates`: every evaluated checkpoint of a trial), so a run whose best point
came before its stop is not lost; `target.candidates: first_at_target` keeps MUSE's rule instead (per trial,
the first checkpoint whose forget gap reaches the band). Neighbours for robustness are other trials'
candidates: a trial's own checkpoints share its hyperparameters and would vouch for each other.

`recommend` is a pure function of the candidate rows and the target: the study driver calls it once as trials
finish and stores the result (`tuner.results.derived`); every view reads what was stored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tuner.core.hparams import LR, Hyperparameter
from tuner.core.metrics import get as metric
from tuner.core.status import DIVERGED, FAILED, UNFINISHED
from tuner.engine import methods
from tuner.results.candidates import LIMITS, OK_STATUSES, YARDSTICK, check_failures


def outcome(row: dict[str, Any], target: dict[str, float], band: tuple[str, ...] = ()) -> str:
    """remembered / in_band / over_unlearned / diverged / failed (and running / interrupted): the classes
    the dashboards colour. `band`: the figures beyond the forget gap that must be within their tolerance
    (`tuner.core.metrics.band_metrics` of the study's objectives: its MIA AUC, privleak). In the band says
    nothing of utility; `succeeded` adds that."""
    if row["status"] in UNFINISHED:
        return row["status"]
    if row["status"] == DIVERGED:
        return DIVERGED
    gap = row["metrics"].get("forget_gap")
    if row["status"] not in OK_STATUSES or gap is None:
        return FAILED
    if gap < -target["gap_tolerance"]:
        return "remembered"
    if gap > target["gap_tolerance"]:
        return "over_unlearned"
    for name in band:
        value, spec = row["metrics"].get(name), metric(name)
        tolerance = target.get(spec.tolerance) if spec.tolerance else None
        if value is not None and tolerance is not None and abs(value - spec.ideal) > tolerance:
            return spec.side(value)
    return "in_band"


def succeeded(row: dict[str, Any], target: dict[str, float], band: tuple[str, ...] = ()) -> bool | None:
    """In the target band without collapsing: the utility drop stays within `utility_tolerance` (and each of
    `band` within its tolerance). None when the row is in the band by its forget gap but lacks a figure the
    rule needs: a missing figure is neither a success nor a failure."""
    if outcome(row, target, band) != "in_band":
        return False
    metrics = row.get("metrics") or {}
    if missing(row, target, band):
        return None
    return metrics["utility_drop"] <= target["utility_tolerance"]


def missing(row: dict[str, Any], target: dict[str, Any], band: tuple[str, ...] = ()) -> list[str]:
    """The figures the rule needs that this candidate does not have (mid-run points carry no MIA or
    memorisation figures, and utility only at some points)."""
    needed = ["forget_gap", "utility_drop", *band]
    if target.get("em_tolerance") is not None:  # the limit compares with the exact retrain's, else unseen EM
        needed += ["forget_em"] + ([] if "forget_em" in (target.get(YARDSTICK) or {}) else ["unseen_em"])
    return [name for name in needed if (row.get("metrics") or {}).get(name) is None]


def axes(rows: list[dict[str, Any]]) -> list[Hyperparameter]:
    """The declared hyperparameters the rows' settings vary along (the method's, in declaration order; a
    name no method declares any more is left out)."""
    names = {k for r in rows for k, v in (r.get("params") or {}).items() if v is not None}
    method = next((r.get("method") for r in rows if r.get("method") in methods.available()), None)
    return [hp for hp in methods.space_of(method) if hp.name in names]


def scaled_params(rows: list[dict[str, Any]]) -> list[list[float]]:
    """Hyperparameters scaled to [0, 1] per study unit, each on its declared scale (log for lr, λ, ...)."""
    hps = axes(rows)
    raw = [[hp.coordinate(r["params"].get(hp.name, hp.default)) for hp in hps] for r in rows]
    lows = [min(col) for col in zip(*raw, strict=True)] if raw else []
    spans = [(max(col) - lo) or 1.0 for col, lo in zip(zip(*raw, strict=True), lows, strict=True)] if raw else []
    return [[(v - lo) / s for v, lo, s in zip(row, lows, spans, strict=True)] for row in raw]


def robustness(rows: list[dict[str, Any]], success: list[bool | None], bandwidth: float) -> list[float | None]:
    """Kernel-weighted share of *other* trials' candidates nearby that also succeed; None with none.
    Candidates whose success is unknown (a figure missing) count neither way.

    All pairs at once with numpy: the dashboards recompute it on every load, and pure-Python pairs took most
    of a 2000-trial page's server time."""
    if not rows:
        return []
    scaled = scaled_params(rows)
    coords = np.array(scaled, dtype=float).reshape(len(rows), len(scaled[0]))  # (trials, params), params may be 0
    squared = np.zeros((len(rows), len(rows)))
    for column in coords.T:  # one parameter at a time: memory stays (trials x trials)
        squared += (column[:, None] - column[None, :]) ** 2
    weights = np.exp(-squared / (2 * bandwidth ** 2))
    trial = np.array([r["id"] for r in rows])
    weights[trial[:, None] == trial[None, :]] = 0.0  # a trial's own checkpoints (and itself) are no neighbours
    weights[:, np.array([ok is None for ok in success], dtype=bool)] = 0.0
    num = weights @ np.array([bool(ok) for ok in success], dtype=float)
    den = weights.sum(axis=1)
    return [float(n / d) if d > 1e-9 else None for n, d in zip(num, den, strict=True)]


def window_width(rows: list[dict[str, Any]], success: list[bool | None]) -> float:
    """Width of the success window in decades of learning rate (0 for a single success)."""
    lrs = [LR.coordinate(r["params"][LR.name]) for r, ok in zip(rows, success, strict=True) if ok]
    return max(lrs) - min(lrs) if lrs else 0.0


def selectable(rows: list[dict[str, Any]], target: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates the rule may pick: all of them, or per trial (MUSE's rule, `first_at_target`) only its
    first checkpoint whose forget gap reaches the band, else its selected one."""
    if target.get("candidates", "all") != "first_at_target":
        return rows
    out, chosen = [], {}
    for r in sorted(rows, key=lambda r: (r["id"], r.get("step") or 0)):
        gap = (r.get("metrics") or {}).get("forget_gap")
        if r["id"] not in chosen and gap is not None and gap >= -target["gap_tolerance"]:
            chosen[r["id"]] = r
    for r in rows:
        first = chosen.get(r["id"])
        if first is r or (first is None and r.get("selected", True)):
            out.append(r)
    return out


def _confirmable(row: dict[str, Any]) -> bool:
    return row.get("measured", "full") == "estimate"


def _full(row: dict[str, Any]) -> bool:
    """Measured in full: a selected checkpoint, or a mid-run one that a confirmation re-ran and scored."""
    return row.get("measured", "full") in ("full", "confirmed")


def recommend_unit(rows: list[dict[str, Any]], target: dict[str, Any], band: tuple[str, ...] = ()) -> dict[str, Any]:
    """The unit's pick among its candidates (rows of `tuner.results.candidates.candidates`, or plain trial rows).

    Only candidates measured in full can be recommended. A mid-run candidate (an estimate) that would beat
    the best full one is listed under `confirm`, best first, one at a time while the unit's confirmation
    budget (`target.confirmations`) lasts: the study driver re-runs it to its step, scores it in full and
    derives again (`tuner.study.rechecks`). Once the budget is spent, estimates are left out, and the reason says so."""
    finished = selectable([r for r in rows if r["status"] not in UNFINISHED], target)
    if not finished:
        return {"trial_id": None, "status": "none", "reason": "no finished trials", "robustness": None,
                "window_width": 0.0, "success_rate": 0.0, "n_trials": 0, "confirm": []}
    classes = [outcome(r, target, band) for r in finished]
    success = [succeeded(r, target, band) for r in finished]
    robust = robustness(finished, success, target.get("neighbourhood", 0.25))
    trials = [i for i, r in enumerate(finished) if r.get("selected", True)]  # one per trial, for the rates
    base = {"window_width": window_width([finished[i] for i in trials], [success[i] for i in trials]),
            "success_rate": sum(bool(success[i]) for i in trials) / len(trials) if trials else 0.0,
            "n_trials": len(trials), "n_candidates": len(finished), "confirm": []}
    failures = {i: check_failures(finished[i]["metrics"], target) for i in range(len(finished))}
    limited = [metric for limit, metric, _ in LIMITS if target.get(limit) is not None]

    def rank(i: int) -> tuple:
        """A candidate checked against the study's robustness limits before an unchecked one, then robust
        first, then the smallest utility drop (an unmeasured one last)."""
        drop = finished[i]["metrics"].get("utility_drop")
        checked = all(finished[i]["metrics"].get(m) is not None for m in limited)
        return (not checked, not _solid(robust[i], target), math.inf if drop is None else drop,
                finished[i]["id"], finished[i].get("step") or 0)

    hopeful = [i for i, c in enumerate(classes) if c == "in_band" and success[i] is not False and not failures[i]]
    winners = [i for i in hopeful if success[i] and _full(finished[i])]
    best = min(winners, key=rank) if winners else None
    # an estimate that would beat the best full measurement, or one whose figures are missing (it might)
    contenders = sorted((i for i in hopeful if _confirmable(finished[i])
                         and (best is None or success[i] is None or rank(i) < rank(best))), key=rank)
    used = sum(1 for r in finished if r.get("measured") in ("confirmed", "unconfirmed"))
    budget = int(target.get("confirmations", 0))
    notes = [f"trial {r['number']} step {r.get('step')}: confirmation failed ({r.get('reason')})"
             for r in finished if r.get("measured") == "unconfirmed"]
    if contenders and used < budget:
        base["confirm"] = [{"trial_id": finished[i]["id"], "step": finished[i].get("step"),
                            "missing": missing(finished[i], target, band),
                            "estimated": finished[i].get("estimated", [])} for i in contenders[:1]]
    elif contenders:
        notes.append(f"{len(contenders)} mid-run candidate(s) that might do better were left out: their figures "
                     f"were not measured in full and the unit's confirmation budget ({budget}, "
                     "target.confirmations) is spent")
    skipped = [f"skipped trial {finished[i]['number']} step {finished[i].get('step')}: {'; '.join(failures[i])}"
               for i, c in enumerate(classes) if c == "in_band" and success[i] and failures[i]]
    if best is not None:
        row = finished[best]
        solid = _solid(robust[best], target)
        checked = all(row["metrics"].get(m) is not None for m in limited)
        reason = (f"in the target band (gap {row['metrics']['forget_gap']:+.3f}) with the smallest utility drop "
                  + ("among robust settings" if solid else "(no setting had succeeding neighbours: not robust)")
                  + (f"; measured in full by re-running trial {row['number']} to step {row.get('step')}"
                     if row.get("measured") == "confirmed" else "")
                  + (f"; {len(skipped)} candidate(s) in the band skipped: they fail a limit of the target "
                     "(robustness, memorisation)" if skipped else ""))
        unchecked = [] if checked or not limited else [
            "not checked against the study's robustness limits (`robustness.when: pareto_at_end` checks every "
            "Pareto candidate)"]
        return {"trial_id": row["id"], "status": "recommended", "reason": reason, "robustness": robust[best],
                "warnings": unchecked + skipped[:5] + notes, **base, **_summary(row, target)}
    if base["confirm"]:
        pick = base["confirm"][0]
        return {"trial_id": None, "status": "to_confirm", "robustness": None, **base, "warnings": notes,
                "reason": f"awaiting the confirmation of trial {finished[contenders[0]]['number']} step "
                          f"{pick['step']}: its figures are estimates until it is re-run and scored in full"}
    measured = [i for i in range(len(finished)) if _full(finished[i])]
    failing = [i for i in measured if classes[i] == "in_band" and success[i] and failures[i]]
    if failing:
        pick_i = min(failing, key=rank)
        row = finished[pick_i]
        return {"trial_id": row["id"], "status": "closest", "robustness": robust[pick_i], **base,
                **_summary(row, target), "warnings": skipped[:5] + notes,
                "reason": f"every candidate in the target band fails a limit of the target ({failures[pick_i][0]})"}
    collapsed = [i for i in measured if classes[i] == "in_band" and success[i] is False]
    if collapsed:
        pick_i = min(collapsed, key=rank)
        row = finished[pick_i]
        drop = row["metrics"]["utility_drop"]
        return {"trial_id": row["id"], "status": "closest", "robustness": robust[pick_i], **base,
                **_summary(row, target),
                "reason": f"reached the target band only by collapsing utility (drop {drop:+.3f} > tolerance "
                          f"{target['utility_tolerance']})",
                "warnings": [f"utility drop {drop:+.3f} exceeds the tolerance {target['utility_tolerance']}"] + notes}
    usable = [i for i in measured if classes[i] in ("remembered", "over_unlearned", "in_band")]
    if not usable:
        why = "every trial diverged or failed" if not notes else "no candidate was measured in full"
        return {"trial_id": None, "status": "none", "reason": why, "robustness": None, "warnings": notes, **base}
    pick_i = min(usable, key=lambda i: abs(finished[i]["metrics"]["forget_gap"]))
    row = finished[pick_i]
    if classes[pick_i] == "in_band":
        why = (f"in the target band (gap {row['metrics']['forget_gap']:+.3f}) but its "
               f"{', '.join(missing(row, target, band))} was not measured")
    else:
        why = ("no trial reached the target band; closest is "
               + ("under-unlearned: the forget set is still remembered" if classes[pick_i] == "remembered"
                  else "over-unlearned: the forget set now looks less likely than unseen text")
               + f" (gap {row['metrics']['forget_gap']:+.3f})")
    return {"trial_id": row["id"], "status": "closest", "reason": why, "robustness": robust[pick_i],
            "warnings": notes, **base, **_summary(row, target)}


SUMMARY = ("forget_gap", "utility_drop", "mia_auc", "privleak", "forget_em", "forget_es", "forget_nll", "unseen_nll",
           "retain_nll")  # the figures a recommendation carries
CHECKED = ("relearn_gap", "relearn_drop", "relearn_speed_ratio", "quant4_gap", "quant8_gap", "quant4_utility_drop",
           "forget_gap_std", "utility_drop_std", "forget_gap_spread", "utility_drop_spread")  # robustness checks


def _solid(score: float | None, target: dict[str, float]) -> bool:
    return score is not None and score >= target.get("min_robustness", 0.5)


def _summary(row: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    return {"number": row["number"], "params": row["params"], "step": row.get("step"),
            "selected": row.get("selected", True), "measured": row.get("measured", "full"),
            "estimate": row.get("estimate"), "check_failures": check_failures(row["metrics"], target),
            "metrics": {**{k: row["metrics"].get(k) for k in SUMMARY},
                        **{k: row["metrics"][k] for k in CHECKED if row["metrics"].get(k) is not None}}}


def recommend(rows: list[dict[str, Any]], target: dict[str, float], band: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per search unit and overall, from a study's trial rows (`Store.trials`); the overall pick is the
    best-utility unit recommendation, robust first."""
    units: dict[str, dict[str, Any]] = {}
    for unit in dict.fromkeys(r["unit"] for r in rows):
        units[unit] = recommend_unit([r for r in rows if r["unit"] == unit], target, band)
    picks = [(u, rec) for u, rec in units.items() if rec["status"] == "recommended"]
    if picks:
        def key(item):
            rec = item[1]
            return (not _solid(rec["robustness"], target), rec["metrics"]["utility_drop"])

        unit, rec = min(picks, key=key)
        overall = {"unit": unit, **rec}
    else:
        overall = {"unit": None, "trial_id": None, "status": "none", "reason": "no method reached the target band"}
    return {"units": units, "overall": overall}


def robustness_line(rec: dict[str, Any], exact: dict[str, Any] | None, target: dict[str, Any]) -> str:
    """One line of what the robustness checks found for a recommendation (empty when none ran): the gap after
    the relearning attack against the exact-retrain model's, after 4/8-bit quantization, the seed spread, and
    whether the study's limits hold."""
    m = rec.get("metrics") or {}
    parts = []
    if m.get("relearn_gap") is not None:
        text = f"relearn gap {m['relearn_gap']:+.3f}"
        retrain = (exact or {}).get("relearn") or {}
        if retrain.get("relearn_gap") is not None:
            text += f" (exact-retrain {retrain['relearn_gap']:+.3f})"
        if m.get("relearn_speed_ratio") is not None:
            text += f", relearns {m['relearn_speed_ratio']:.1f}x as fast as the retrain model"
        parts.append(text)
    for bits in (4, 8):
        if m.get(f"quant{bits}_gap") is not None:
            parts.append(f"{bits}-bit gap {m[f'quant{bits}_gap']:+.3f}")
    if m.get("forget_gap_std") is not None:
        parts.append(f"over seeds gap ±{m['forget_gap_std']:.3f}, utility drop ±{m.get('utility_drop_std', 0):.3f}")
    if not parts:
        return ""
    if rec.get("check_failures"):
        verdict = "FAILS: " + "; ".join(rec["check_failures"])
    elif any(target.get(limit) is not None for limit, _, _ in LIMITS):
        verdict = "within the study's limits"
    else:
        verdict = "no limits set (target.relearn_limit, target.quant_limit)"
    return ", ".join(parts) + f"; {verdict}"
