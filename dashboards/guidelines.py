"""The brief's five tuning guidelines, each checked against the study's own data.

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
from tuner.hparams import LR

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
            robust_over_lucky(data)]


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
    collapsed = sum(r["outcome"] == "diverged" or (r["metrics"].get("utility_drop") or 0.0)
                    > data.target["utility_tolerance"] for r in ga.finished)
    narrow = ga_rate < ref or (ga_rate == ref and ga.window_decades < statistics.median(u.window_decades for u in others))
    kind = "GA+descent/KL" if _retain_units(data) else "other"
    facts = (f"GA succeeds in {len(ga.successes)}/{len(ga.finished)} trials ({ga_rate:.0%}, window "
             f"{ga.window_decades:.2f} decades of {LR.short}) against a median {ref:.0%} over {len(others)} {kind} "
             "methods; "
             f"{collapsed} GA trials diverged or exceeded the utility tolerance")
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
