"""Results derived from a study's trials, computed once and stored: each trial's Pareto flag and the
recommendation. The study driver refreshes them as trials finish and when a study ends or resumes; the
dashboards, `study show` and export read what is stored instead of computing them again."""

from __future__ import annotations

from tuner.pareto import front_ids
from tuner.recommend import recommend
from tuner.store import Store


def refresh(store: Store, name: str) -> dict:
    """Derive the study's Pareto flags and recommendation from its stored trials and store both."""
    study = store.study(name)
    objectives = list(study.spec.get("objectives") or [])
    rows = store.trials(name)
    store.set_pareto(study.id, {i for ids in front_ids(rows, objectives).values() for i in ids})
    rec = recommend(rows, study.spec["target"], "mia_auc" in objectives)
    store.replace_recommendations(study.id, [(unit, r.get("trial_id"), r) for unit, r in rec["units"].items()]
                                  + [(None, rec["overall"].get("trial_id"), rec["overall"])])
    return rec
