"""The brief's five tuning guidelines, each checked against the study's own data, and a sixth check of
guidelines 2 and 3 under attack: are the settings they call robust the ones whose forgetting survives the
robustness checks (relearning, quantization)?

Every check returns one of three verdicts — ``holds``, ``contradicted`` or ``not enough data`` — with a
one-line reason built from the numbers it used, and the id of the figure that shows the evidence. A
guideline the data contradicts is reported as contradicted, never hidden.

A *success* is a trial in the target band (|forget gap| <= gap_tolerance) whose utility drop is within
utility_tolerance (see `dashboards.data`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from dashboards.data import StudyData, Unit
from tuner.core.hparams import LR
from tuner.core.status import DIVERGED

HOLDS, CONTRADICTED, NOT_ENOUGH = "holds", "contradicted", "not enough data"
MIN_TRIALS = 3  # finished trials a unit needs before its success rate is compared


@dataclass
class Check:
    number: int
    title: str
    rule: str
    verdict: str
    reason: str
    figure: str  # element id of the figure that shows it
    figure_name: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def check_all(data: StudyData) -> list[Check]:
    return [stop_at_target(data), ga_is_brittle(data), in_distribution_descent(data), lr_steps_trade_off(data),
            robust_over_lucky(data), robust_where_predicted(data)]


# ---- 1 -------------------------------------------------------------------------------------------------------

def stop_at_target(data: StudyData) -> Check:
    """Past gap 0, steps only over-unlearn and cost utility. Within a curve: after its point closest to gap 0,
    the evaluations that went further past 0 must show a larger gap and a higher retain NLL. Across trials of
    one unit: over-unlearned trials lost more utility than in-band ones."""
    title, rule = "Stop at the approximate-retraining point", \
        "unlearning is done at forget gap 0; steps past it only over-unlearn and cost utility"
    within_ok = within_n = 0
    for pts in data.curves.values():
        pts = [p for p in pts if p.get("forget_gap") is not None and p.get("retain_nll") is not None]
        if not pts:
            continue
        c = min(range(len(pts)), key=lambda i: abs(pts[i]["forget_gap"]))
        past = [p for p in pts[c + 1:] if p["forget_gap"] > max(0.0, pts[c]["forget_gap"])]
        if not past:
            continue
        within_n += 1
        within_ok += past[-1]["retain_nll"] >= pts[c]["retain_nll"] - 1e-3
    across_ok = across_n = 0
    for unit in data.units.values():
        over = [r["metrics"]["utility_drop"] for r in unit.rows
                if r["outcome"] == "over_unlearned" and r["metrics"].get("utility_drop") is not None]
        band = [r["metrics"]["utility_drop"] for r in unit.rows
                if r["outcome"] == "in_band" and r["metrics"].get("utility_drop") is not None]
        if over and band:
            across_n += 1
            across_ok += statistics.median(over) > statistics.median(band)
    stopped = sum(r["result"].get("stop_step") is not None for r in data.rows)
    n, ok = within_n + across_n, within_ok + across_ok
    facts = (f"in {within_ok}/{within_n} runs that went past gap 0 the extra steps also raised retain NLL; "
             f"in {across_ok}/{across_n} methods over-unlearned trials lost more utility than in-band ones; "
             f"{stopped} trials stopped at the target")
    if n < 2:
        return Check(1, title, rule, NOT_ENOUGH, f"too few comparisons ({facts})", "fig-curves", "Unlearning curves")
    verdict = HOLDS if ok / n >= 0.6 else CONTRADICTED
    return Check(1, title, rule, verdict, facts, "fig-curves", "Unlearning curves")


# ---- 2 -------------------------------------------------------------------------------------------------------

def _rate(unit: Unit) -> float:
    return len(unit.successes) / len(unit.finished)


def _retain_units(data: StudyData) -> list[Unit]:
    return [u for u in data.units.values() if u.method in ("ga_gd", "ga_kl") and len(u.finished) >= MIN_TRIALS]


def ga_is_brittle(data: StudyData) -> Check:
    title, rule = "Gradient ascent alone is brittle", \
        "GA's success window in learning rate × steps is narrow; past it the model collapses"
    fig, name = "fig-robustness", "Robustness map"
    ga = data.units.get("ga")
    if ga is None or len(ga.finished) < MIN_TRIALS:
        return Check(2, title, rule, NOT_ENOUGH, f"GA needs {MIN_TRIALS} finished trials "
                     f"(has {len(ga.finished) if ga else 0})", fig, name)
    others = _retain_units(data) or [u for u in data.units.values()
                                     if u.name != "ga" and len(u.finished) >= MIN_TRIALS]
    if not others:
        return Check(2, title, rule, NOT_ENOUGH, f"no other method has {MIN_TRIALS} finished trials to compare with",
                     fig, name)
    ga_rate, rates = _rate(ga), [_rate(u) for u in others]
    ref = statistics.median(rates)
    if ga_rate == 0 and max(rates) == 0:
        return Check(2, title, rule, NOT_ENOUGH, f"no method succeeded (in the band within the utility tolerance) in "
                     f"{len(ga.finished) + sum(len(u.finished) for u in others)} trials: no windows to compare", fig, name)
    ran = [r["metrics"].get("utility_drop") for r in ga.finished if r["outcome"] != DIVERGED]
    collapsed = len(ga.finished) - len(ran) + sum(d > data.target["utility_tolerance"] for d in ran if d is not None)
    unmeasured = sum(d is None for d in ran)
    narrow = ga_rate < ref or (ga_rate == ref and ga.window_decades < statistics.median(u.window_decades for u in others))
    kind = "GA+descent/KL" if _retain_units(data) else "other"
    facts = (f"GA succeeds in {len(ga.successes)}/{len(ga.finished)} trials ({ga_rate:.0%}, window "
             f"{ga.window_decades:.2f} decades of {LR.short}) against a median {ref:.0%} over {len(others)} {kind} "
             "methods; "
             f"{collapsed} GA trials diverged or exceeded the utility tolerance"
             + (f" ({unmeasured} more have no measured utility drop)" if unmeasured else ""))
    return Check(2, title, rule, HOLDS if narrow else CONTRADICTED, facts, fig, name)


# ---- 3 -------------------------------------------------------------------------------------------------------

def in_distribution_descent(data: StudyData) -> Check:
    title, rule = "Descent on in-distribution data widens the window", \
        "GA + descent on in-distribution retain data succeeds over a wider range and preserves utility"
    fig, name = "fig-robustness", "Robustness map"
    gd = data.units.get("ga_gd@in_distribution")
    base = data.units.get("ga") or data.units.get("ga_gd@general")
    if gd is None or base is None:
        return Check(3, title, rule, NOT_ENOUGH, "the study needs ga_gd@in_distribution and ga (or "
                     "ga_gd@general) to compare", fig, name)
    if len(gd.finished) < MIN_TRIALS or len(base.finished) < MIN_TRIALS:
        return Check(3, title, rule, NOT_ENOUGH, f"each of {gd.name} and {base.name} needs {MIN_TRIALS} finished "
                     f"trials (have {len(gd.finished)} and {len(base.finished)})", fig, name)
    gd_rate, base_rate = _rate(gd), _rate(base)
    if gd_rate == 0 and base_rate == 0:
        return Check(3, title, rule, NOT_ENOUGH, f"neither {gd.name} nor {base.name} succeeded (in the band within the "
                     "utility tolerance): no windows to compare", fig, name)
    gd_drop, base_drop = _median_drop(gd), _median_drop(base)
    wider = gd_rate > base_rate or (gd_rate == base_rate and gd.window_decades > base.window_decades)
    keeps = gd_drop is not None and base_drop is not None and gd_drop <= base_drop
    facts = (f"{gd.name} succeeds in {gd_rate:.0%} (window {gd.window_decades:.2f} dec), {base.name} in {base_rate:.0%} "
             f"(window {base.window_decades:.2f} dec); median utility drop {_f(gd_drop)} against {_f(base_drop)}")
    general = data.units.get("ga_gd@general")
    if general is not None and general is not base and len(general.finished) >= MIN_TRIALS:
        facts += f"; {general.name} succeeds in {_rate(general):.0%}"
    return Check(3, title, rule, HOLDS if wider and keeps else CONTRADICTED, facts, fig, name)


def _median_drop(unit: Unit) -> float | None:
    drops = [r["metrics"]["utility_drop"] for r in unit.finished if r["metrics"].get("utility_drop") is not None]
    return statistics.median(drops) if drops else None


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


# ---- 4 -------------------------------------------------------------------------------------------------------

def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def lr_steps_trade_off(data: StudyData) -> Check:
    """Among trials that reached the target (stopped there, or finished in the band), rank correlation of the
    learning rate with the steps it took, within each method, pooled weighted by trials."""
    title, rule = "Learning rate and steps trade off", \
        "search the learning rate on a log scale; along the success ridge a smaller rate needs more steps"
    fig, name = "fig-parallel", "Parallel coordinates"
    lr_log = ((data.spec.get("search") or {}).get(LR.name) or {}).get("log", LR.log)
    weighted = total = 0.0
    per_unit = []
    for unit in data.units.values():
        pts = []
        for r in unit.rows:
            res = r["result"]
            steps = res.get("stop_step") if res.get("stop_step") is not None else (
                res.get("selected_step") if r["outcome"] == "in_band" else None)
            if steps and r["params"].get(LR.name):
                pts.append((LR.coordinate(r["params"][LR.name]), float(steps)))
        rho = spearman([p[0] for p in pts], [p[1] for p in pts])
        if rho is not None:
            per_unit.append(f"{unit.name} {rho:+.2f} (n={len(pts)})")
            weighted += rho * len(pts)
            total += len(pts)
    scale = "" if lr_log else f"; note: the spec searched {LR.short} on a linear scale"
    if not total:
        return Check(4, title, rule, NOT_ENOUGH, "no method has 3 trials that reached the target" + scale, fig, name)
    rho = weighted / total
    facts = (f"rank correlation of {LR.short} with steps to the target {rho:+.2f} over {int(total)} trials "
             f"({'; '.join(per_unit)})")
    if rho <= -0.3:
        verdict = HOLDS
    elif rho >= 0.3 or total >= 8:
        verdict = CONTRADICTED
    else:
        verdict = NOT_ENOUGH
    return Check(4, title, rule, verdict, facts + scale, fig, name)


# ---- 5 -------------------------------------------------------------------------------------------------------

def robust_over_lucky(data: StudyData) -> Check:
    """The recommender's pick: is it inside a region where neighbouring settings also succeed?"""
    title, rule = "Prefer robust settings over lucky ones", \
        "recommend the middle of a wide success region, not an isolated best point"
    fig, name = "fig-pareto", "Pareto front (★ recommended)"
    rec = data.recommendation
    if rec is None:
        return Check(5, title, rule, NOT_ENOUGH, data.recommendation_note or "no recommendation", fig, name)
    threshold = data.target.get("min_robustness", 0.5)
    picks = {u: r for u, r in (rec.get("units") or {}).items() if r.get("status") == "recommended"}
    if not picks:
        return Check(5, title, rule, NOT_ENOUGH, "no method has a trial in the target band to recommend", fig, name)
    robust = [u for u, r in picks.items() if r.get("robustness") is not None and r["robustness"] >= threshold]
    overall = rec.get("overall") or {}
    score = overall.get("robustness")
    facts = (f"{len(robust)}/{len(picks)} method picks have ≥ {threshold:.0%} succeeding neighbours; overall pick "
             f"{overall.get('unit') or '–'} robustness {'–' if score is None else f'{score:.2f}'}")
    if robust and score is not None and score >= threshold:
        return Check(5, title, rule, HOLDS, facts, fig, name)
    successes = sum(len(u.in_band) for u in data.units.values())
    if successes < 2:
        return Check(5, title, rule, NOT_ENOUGH, facts + "; fewer than 2 trials in the band", fig, name)
    return Check(5, title, rule, CONTRADICTED, facts + ": the successes are isolated, no robust region yet", fig, name)


# ---- 6: guidelines 2 and 3 under attack ------------------------------------------------------------------------

ATTACK_METRICS = (("relearn_gap", "relearn gap"), ("quant4_gap", "4-bit gap"))  # higher: stays forgotten


def _checked_in_band(data: StudyData) -> dict[str, list[dict[str, Any]]]:
    """unit → its checked candidates (`StudyData.checked_candidates`) whose own forget gap is in the band."""
    tol = data.target["gap_tolerance"]
    out: dict[str, list[dict[str, Any]]] = {}
    for c in data.checked_candidates():
        if c["forget_gap"] is not None and abs(c["forget_gap"]) <= tol:
            out.setdefault(c["row"]["unit"], []).append(c)
    return out


def _median_of(cands: list[dict[str, Any]], key: str) -> float | None:
    values = [c["metrics"][key] for c in cands if c["metrics"].get(key) is not None and math.isfinite(c["metrics"][key])]
    return statistics.median(values) if values else None


def robust_where_predicted(data: StudyData) -> Check:
    """Guidelines 2 and 3 say GA+GD on in-distribution retain data is the robust choice and GA alone collapses
    or relearns. Among the checked candidates in the target band, the median forget gap after the relearning
    attack (and after 4-bit quantization) of `ga_gd@in_distribution` against `ga`'s: higher (less negative)
    keeps the forget set forgotten. Holds when GA+GD in-distribution is at least as good on every metric both
    have; also says which unit's checked candidates stay forgotten best after the attack."""
    title, rule = "Robust settings where the guidelines predict them", \
        "GA + descent on in-distribution retain data keeps the forget set forgotten under relearning and " \
        "quantization; GA alone relearns"
    fig, name = "fig-attacks", "Robustness under attack"
    checked = _checked_in_band(data)
    all_checked = data.checked_candidates()
    if not all_checked:
        return Check(6, title, rule, NOT_ENOUGH, "no robustness checks ran (robustness.when in the spec)", fig, name)
    # every unit's median relearn gap, best first: which keeps the forget set forgotten after the attack
    ranking = sorted(((u, m) for u, cands in checked.items() if (m := _median_of(cands, "relearn_gap")) is not None),
                     key=lambda item: -item[1])
    retrain = data.retrain_relearn.get("relearn_gap")
    best = ""
    if ranking:
        best = (f"; best after the attack: {ranking[0][0]} (median relearn gap {ranking[0][1]:+.3f} over "
                f"{len(checked[ranking[0][0]])} in-band candidates)")
        if len(ranking) > 1:
            best += ", then " + ", ".join(f"{u} {m:+.3f}" for u, m in ranking[1:4])
    if retrain is not None:
        best += f"; the exact-retrain model's relearn gap {retrain:+.3f}"
    gd_name, ga_name = "ga_gd@in_distribution", "ga"
    missing = []
    for unit in (gd_name, ga_name):
        if not checked.get(unit):
            n = sum(c["row"]["unit"] == unit for c in all_checked)
            missing.append(f"{unit} has no checked candidate" if not n else
                           f"{unit} has {n} checked candidate(s), none in the target band")
    if missing:
        return Check(6, title, rule, NOT_ENOUGH, "; ".join(missing) + best, fig, name)
    compared, parts = [], []
    for key, label in ATTACK_METRICS:
        gd, ga = _median_of(checked[gd_name], key), _median_of(checked[ga_name], key)
        if gd is None or ga is None:
            continue
        compared.append(gd >= ga - 1e-9)
        parts.append(f"median {label} {gd_name} {gd:+.3f} against {ga_name} {ga:+.3f}")
    if not compared:
        return Check(6, title, rule, NOT_ENOUGH, f"{gd_name} and {ga_name} share no checked metric (relearn gap, "
                     "4-bit gap)" + best, fig, name)
    facts = (f"{'; '.join(parts)} ({len(checked[gd_name])} and {len(checked[ga_name])} checked in-band candidates)"
             + best)
    return Check(6, title, rule, HOLDS if all(compared) else CONTRADICTED, facts, fig, name)
