"""Results derived from a study's trials, computed once and stored: the Pareto flags of its candidates
(every evaluated checkpoint, `tuner.results.candidates`) and of its trials, and the recommendation. The study driver
refreshes them as trials finish and when a study ends or resumes; the dashboards, `study show` and export
read what is stored instead of computing them again."""

from __future__ import annotations

from tuner.core.metrics import band_metrics
from tuner.results.candidates import candidates, key
from tuner.results.pareto import front_members
from tuner.results.recommend import recommend
from tuner.results.target import Target
from tuner.store import Store


def refresh(store: Store, name: str) -> dict:
    """Derive the study's Pareto flags and recommendation from its stored trials and curves; store both."""
    study = store.study(name)
    objectives = list(study.spec.get("objectives") or [])
    cands = candidates(store.trials(name), store.study_curves(study.id), objectives, store.study_checks(name))
    store.set_pareto(study.id, {key(c) for members in front_members(cands, objectives).values() for c in members})
    target = Target.model_validate(study.spec["target"]).rule(study.exact_retrain)
    rec = recommend(cands, target, band_metrics(objectives))
    store.replace_recommendations(study.id, [(unit, r.get("trial_id"), r) for unit, r in rec["units"].items()]
                                  + [(None, rec["overall"].get("trial_id"), rec["overall"])])
    return rec
