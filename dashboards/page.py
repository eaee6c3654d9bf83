"""What the study page says besides its figures, shared by the Dash app and the HTML export: the header
facts, the recommendation summary and the guideline panel, as plain data (the callers escape or let Dash
escape every string)."""

from __future__ import annotations

from typing import Any

from dashboards.data import StudyData, fmt
from dashboards.guidelines import CONTRADICTED, HOLDS, check_all
from tuner.core.hparams import LR
from tuner.core.metrics import leak_reference_text
from tuner.engine.methods import describe
from tuner.results.recommend import robustness_line

VERDICT_COLOURS = {HOLDS: "#1a7f37", CONTRADICTED: "#cf222e", "not enough data": "#6e7781"}
SECTIONS = (
    ("fig-pareto", "1. Pareto front across methods",
     "Each method's front over the study's objectives as a line, dominated trials faded; green band: the "
     "approximate-retraining target; red dashed line: the utility tolerance; ★: each method's recommended point."),
    ("fig-robustness", "2. Robustness map",
     f"{LR.label.capitalize()} against each of the method's other hyperparameters (one row of panels each: "
     f"epochs, λ and the method's own), per method, coloured by outcome; the shaded {LR.short} span is the "
     "method's success window (in the band with the utility drop within tolerance)."),
    ("fig-attacks", "2b. Robustness under attack",
     "Each checked candidate's forget gap before (●) and after the relearning attack (▲) and 4-bit (■) and 8-bit "
     "(◆) quantization, per method; green band: the target; black dashed line: the exact-retrain model's gap after "
     "the same attack (testbed). Below the band after an attack: the forget set came back."),
    ("fig-curves", "3. Unlearning curves",
     "Forget, unseen and retain NLL against step for the chosen trials, the forget gap against the target band, "
     "stop points and (testbed) the exact-retrain model's forget NLL."),
    ("fig-calibration", "3b. Learning-rate calibration",
     "Each unit's lr range test before its search: one run with the lr rising step by step over the declared "
     "range; the forget gap (top, green band: the target) and the utility drop (bottom, red dashed line: the "
     "tolerance) against the lr. ▲ the gap moved, ★ it reached the band, × the utility collapsed; shaded: the lr "
     "window the unit's trials drew from; dotted, labelled with their epochs: the peak lrs of the calibration's "
     "guideline points (those inside the searched ranges were the unit's first trials)."),
    ("fig-hypervolume", "4a. Hypervolume history", "Dominated hypervolume of each method's search after each trial."),
    ("fig-parallel", "4b. Parallel coordinates",
     "Hyperparameters to objectives, one line per trial; hover the points on the forget-gap axis for the trial. "
     "Click a legend entry to hide an outcome."),
    ("fig-efficiency", "6. Efficiency", "Device-seconds and tokens per trial and in total, against retraining."),
)


def header_facts(data: StudyData) -> list[tuple[str, str]]:
    t = data.target
    counts: dict[str, int] = {}
    for r in data.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    facts = [("model", data.model), ("status", data.status),
             ("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"),
             ("search units", str(len(data.units))), ("objectives (minimised)", ", ".join(data.objectives)),
             ("target", f"|forget gap| ≤ {t['gap_tolerance']:g}, utility drop ≤ {t['utility_tolerance']:g}"
                        + (f", |MIA AUC − 0.5| ≤ {t['mia_tolerance']:g}" if "mia_auc" in data.band else "")
                        + (f", |privleak| ≤ {t['privleak_tolerance']:g} %" if "privleak" in data.band else "")
                        + (f", forget EM ≤ target's + {t['em_tolerance']:g}" if t.get("em_tolerance") is not None
                           else "")),
             ("sampler / budget", f"{(data.spec.get('sampler') or {}).get('name', '?')}, "
                                  f"{(data.spec.get('budget') or {}).get('trials', '?')} trials per unit")]
    if data.baseline:
        facts.append(("original model", f"forget gap {fmt(data.baseline.get('forget_gap'), '+.3f')}, MIA AUC "
                                        f"{fmt(data.baseline.get('mia_auc'))}"))
    facts.append(("privleak measured against", leak_reference_text(data.exact_retrain)))
    if data.exact_retrain:
        retrain = data.retrain_relearn
        facts.append(("exact retrain (testbed)", f"forget NLL {fmt(data.exact_retrain.get('forget_nll'))}, gap "
                                                 f"{fmt(data.exact_retrain.get('forget_gap'), '+.3f')}"
                      + (f", gap after the relearning attack {fmt(retrain.get('relearn_gap'), '+.3f')}"
                         if retrain.get("relearn_gap") is not None else "")))
    for unit, record in data.importances.items():
        facts.append((f"parameter importance, {unit}", importance_text(record)))
    if data.created_at is not None:
        facts.append(("created", f"{data.created_at:%Y-%m-%d %H:%M} UTC"))
    if data.versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in data.versions.items())))
    return facts


def importance_text(record: dict[str, Any]) -> str:
    """Per objective, the hyperparameters that explained most of its variation over the unit's finished trials
    (PED-ANOVA shares), or why there is no such figure."""
    if "note" in record:
        return record["note"]
    return "; ".join(f"{objective}: " + (", ".join(f"{p} {v:.2f}" for p, v in list(shares.items())[:3])
                                         or "did not vary")
                     for objective, shares in record["objectives"].items()) + f" (PED-ANOVA, {record['trials']} trials)"


def recommendation_rows(data: StudyData) -> list[dict[str, str]]:
    """One line per unit (overall first): status, trial, hyperparameters, gap, utility drop, robustness, what the
    robustness checks found (`tuner.results.recommend.robustness_line`), reason. `failing` is the joined
    `check_failures` of a recommendation that fails the study's robustness limits (empty otherwise)."""
    rec = data.recommendation
    if rec is None:
        return []
    items = [("overall", rec.get("overall") or {})] + list((rec.get("units") or {}).items())
    out = []
    for label, r in items:
        row = data.row(r.get("trial_id"))
        params = (row or {}).get("params") or r.get("params") or {}
        metrics = (row or {}).get("metrics") or r.get("metrics") or {}
        unit = r.get("unit") if label == "overall" else label
        method = (row or {}).get("method") or getattr(data.units.get(unit or ""), "method", None)
        warnings = "; ".join(r.get("warnings") or [])
        failing = "; ".join(r.get("check_failures") or [])
        out.append({
            "scope": "overall" + (f" ({unit})" if unit else "") if label == "overall" else label,
            "status": r.get("status", "") + (" (fails a limit of the target)" if failing else ""),
            "trial": f"#{row['number']} (id {row['id']})" if row else "–",
            "params": describe(method, params) or "–",
            "forget_gap": fmt(metrics.get("forget_gap"), "+.3f"), "utility_drop": fmt(metrics.get("utility_drop"), "+.3f"),
            "robustness": fmt(r.get("robustness"), ".2f"),
            "checks": robustness_line(r, data.exact_retrain, data.target) or ("FAILS: " + failing if failing else "–"),
            "failing": failing,
            "reason": r.get("reason", "") + (f" (warning: {warnings})" if warnings else ""),
        })
    return out


RECOMMENDATION_COLUMNS = (("scope", "scope"), ("status", "status"), ("trial", "trial"), ("params", "hyperparameters"),
                          ("forget_gap", "forget gap"), ("utility_drop", "utility drop"), ("robustness", "robustness"),
                          ("checks", "robustness checks"), ("reason", "reason"))
FAILING_COLOUR = "#cf222e"


def guideline_rows(data: StudyData) -> list[dict[str, Any]]:
    return [c.as_dict() for c in check_all(data)]
