"""Recommendation: a defensible setting per method and overall, read from a study's stored trials.

Rule (its tolerances are data in the spec's `target`): a trial *succeeds* when its forget gap is within
`gap_tolerance` of 0 (and, when MIA AUC is an objective, its AUC within `mia_tolerance` of 0.5) and its
utility drop within `utility_tolerance` (gap 0 reached by collapsing the model is no success). Among
successes, prefer *robust* ones — whose neighbours in the method's hyperparameter space (each declared knob
on its own scale, `tuner.hparams`) also succeed (guideline 5) — and then the smallest utility drop. With no
success, report the closest trial and why.

It ranks candidates (`tuner.candidates`: every evaluated checkpoint of a trial), so a run whose best point
came before its stop is not lost; `target.candidates: first_at_target` keeps MUSE's rule instead (per trial,
the first checkpoint whose forget gap reaches the band). Neighbours for robustness are other trials'
candidates: a trial's own checkpoints share its hyperparameters and would vouch for each other.

`recommend` is a pure function of the candidate rows and the target: the study driver calls it once as trials
finish and stores the result (`tuner.derived`); every view reads what was stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tuner import methods
from tuner.candidates import LIMITS, OK_STATUSES, check_failures
from tuner.hparams import LR, Hyperparameter


def outcome(row: dict[str, Any], target: dict[str, float], use_mia: bool) -> str:
    """remembered / in_band / over_unlearned / diverged / failed (and running / interrupted): the classes
    the dashboards colour. In the band says nothing of utility; `succeeded` adds that."""
    if row["status"] in ("running", "interrupted"):
        return row["status"]
    if row["status"] == "diverged":
        return "diverged"
    gap = row["metrics"].get("forget_gap")
    if row["status"] not in OK_STATUSES or gap is None:
        return "failed"
    if gap < -target["gap_tolerance"]:
        return "remembered"
    if gap > target["gap_tolerance"]:
        return "over_unlearned"
    mia = row["metrics"].get("mia_auc")
    if use_mia and mia is not None and abs(mia - 0.5) > target["mia_tolerance"]:
        return "remembered" if mia > 0.5 else "over_unlearned"
    return "in_band"


def succeeded(row: dict[str, Any], target: dict[str, float], use_mia: bool) -> bool:
    """In the target band without collapsing: the utility drop stays within `utility_tolerance`."""
    drop = (row.get("metrics") or {}).get("utility_drop")
    return outcome(row, target, use_mia) == "in_band" and (drop is None or drop <= target["utility_tolerance"])


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


def robustness(rows: list[dict[str, Any]], success: list[bool], bandwidth: float) -> list[float | None]:
    """Kernel-weighted share of *other* trials' candidates nearby that also succeed; None with none.

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
    num = weights @ np.asarray(success, dtype=float)
    den = weights.sum(axis=1)
    return [float(n / d) if d > 1e-9 else None for n, d in zip(num, den, strict=True)]


def window_width(rows: list[dict[str, Any]], success: list[bool]) -> float:
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


def recommend_unit(rows: list[dict[str, Any]], target: dict[str, float], use_mia: bool) -> dict[str, Any]:
    """The unit's pick among its candidates (rows of `tuner.candidates.candidates`, or plain trial rows)."""
    finished = selectable([r for r in rows if r["status"] not in ("running", "interrupted")], target)
    if not finished:
        return {"trial_id": None, "status": "none", "reason": "no finished trials", "robustness": None,
                "window_width": 0.0, "success_rate": 0.0, "n_trials": 0}
    classes = [outcome(r, target, use_mia) for r in finished]
    success = [succeeded(r, target, use_mia) for r in finished]
    robust = robustness(finished, success, target.get("neighbourhood", 0.25))
    trials = [i for i, r in enumerate(finished) if r.get("selected", True)]  # one per trial, for the rates
    base = {"window_width": window_width([finished[i] for i in trials], [success[i] for i in trials]),
            "success_rate": sum(success[i] for i in trials) / len(trials) if trials else 0.0,
            "n_trials": len(trials), "n_candidates": len(finished)}
    in_band = [i for i, ok in enumerate(success) if ok]
    failures = {i: check_failures(finished[i]["metrics"], target) for i in in_band}
    winners = [i for i in in_band if not failures[i]]
    skipped = [f"skipped trial {finished[i]['number']} step {finished[i].get('step')}: {'; '.join(failures[i])}"
               for i in in_band if failures[i]]
    # with robustness limits set, a checked candidate that passes them beats one that was never checked
    limited = [metric for limit, metric, _ in LIMITS if target.get(limit) is not None]
    checked = [i for i in winners if all(finished[i]["metrics"].get(m) is not None for m in limited)]
    unchecked = ["not checked against the study's robustness limits (`robustness.when: pareto_at_end` checks "
                 "every Pareto candidate)"] if limited and winners and not checked else []
    winners = checked or winners
    if winners:
        solid = [i for i in winners if _solid(robust[i], target)]
        pool = solid or winners
        best = min(pool, key=lambda i: (finished[i]["metrics"].get("utility_drop") or 0.0, finished[i]["id"],
                                        finished[i].get("step") or 0))
        row = finished[best]
        reason = (f"in the target band (gap {row['metrics']['forget_gap']:+.3f}) with the smallest utility drop "
                  + ("among robust settings" if solid else "(no setting had succeeding neighbours: not robust)")
                  + (f"; {len(skipped)} candidate(s) in the band skipped: they fail a robustness check"
                     if skipped else ""))
        return {"trial_id": row["id"], "status": "recommended", "reason": reason, "robustness": robust[best],
                "warnings": unchecked + skipped[:5], **base, **_summary(row, target)}
    if skipped:
        best = min(in_band, key=lambda i: finished[i]["metrics"].get("utility_drop") or 0.0)
        row = finished[best]
        return {"trial_id": row["id"], "status": "closest", "robustness": robust[best], **base, **_summary(row, target),
                "reason": f"every candidate in the target band fails a robustness check ({failures[best][0]})",
                "warnings": skipped[:5]}
    collapsed = [i for i, c in enumerate(classes) if c == "in_band"]
    if collapsed:
        best = min(collapsed, key=lambda i: finished[i]["metrics"].get("utility_drop") or 0.0)
        row = finished[best]
        drop = row["metrics"]["utility_drop"]
        return {"trial_id": row["id"], "status": "closest", "robustness": robust[best], **base, **_summary(row, target),
                "reason": f"reached the target band only by collapsing utility (drop {drop:+.3f} > tolerance "
                          f"{target['utility_tolerance']})",
                "warnings": [f"utility drop {drop:+.3f} exceeds the tolerance {target['utility_tolerance']}"]}
    usable = [i for i, c in enumerate(classes) if c in ("remembered", "over_unlearned")]
    if not usable:
        return {"trial_id": None, "status": "none", "reason": "every trial diverged or failed",
                "robustness": None, **base}
    best = min(usable, key=lambda i: abs(finished[i]["metrics"]["forget_gap"]))
    row = finished[best]
    why = "under-unlearned: the forget set is still remembered" if classes[best] == "remembered" \
        else "over-unlearned: the forget set now looks less likely than unseen text"
    return {"trial_id": row["id"], "status": "closest",
            "reason": f"no trial reached the target band; closest is {why} (gap {row['metrics']['forget_gap']:+.3f})",
            "robustness": robust[best], **base, **_summary(row, target)}


CHECKED = ("relearn_gap", "relearn_drop", "relearn_speed_ratio", "quant4_gap", "quant8_gap", "quant4_utility_drop",
           "forget_gap_std", "utility_drop_std", "forget_gap_spread", "utility_drop_spread")  # robustness checks


def _solid(score: float | None, target: dict[str, float]) -> bool:
    return score is not None and score >= target.get("min_robustness", 0.5)


def _summary(row: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    return {"number": row["number"], "params": row["params"], "step": row.get("step"),
            "selected": row.get("selected", True), "check_failures": check_failures(row["metrics"], target),
            "metrics": {**{k: row["metrics"].get(k) for k in ("forget_gap", "utility_drop", "mia_auc", "forget_nll",
                                                              "unseen_nll", "retain_nll")},
                        **{k: row["metrics"][k] for k in CHECKED if row["metrics"].get(k) is not None}}}


def recommend(rows: list[dict[str, Any]], target: dict[str, float], use_mia: bool) -> dict[str, Any]:
    """Per search unit and overall, from a study's trial rows (`Store.trials`); the overall pick is the
    best-utility unit recommendation, robust first."""
    units: dict[str, dict[str, Any]] = {}
    for unit in dict.fromkeys(r["unit"] for r in rows):
        units[unit] = recommend_unit([r for r in rows if r["unit"] == unit], target, use_mia)
    picks = [(u, rec) for u, rec in units.items() if rec["status"] == "recommended"]
    if picks:
        def key(item):
            rec = item[1]
            return (not _solid(rec["robustness"], target), rec["metrics"].get("utility_drop") or 0.0)

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
