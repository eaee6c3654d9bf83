"""Why the search went where it went: for each objective of a search unit, the share of its variation that
each hyperparameter explains among the unit's finished trials, by Optuna's PED-ANOVA
(`optuna.importance.PedAnovaImportanceEvaluator`: no extra dependency, meaningful on a few trials). Computed
once at the study's end from the unit's Optuna study and stored with the search; `tuner study show` and the
study page read the stored record."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.store import Store

MIN_TRIALS = 4  # below this, which parameter "mattered" is noise; the record says so instead


def importance(study: optuna.Study) -> dict[str, Any]:
    """{"evaluator", "trials", "objectives": {objective: {param: share}}} (shares sum to 1 per objective,
    largest first; none for an objective that took one value), or {"trials", "note"} where there is nothing to
    attribute."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(trials) < MIN_TRIALS:
        return {"trials": len(trials), "note": f"needs at least {MIN_TRIALS} finished trials ({len(trials)} so far)"}
    varied = sorted({name for t in trials for name in t.params if len({repr(u.params.get(name)) for u in trials}) > 1})
    if not varied:
        return {"trials": len(trials), "note": "no hyperparameter took more than one value"}
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    shares: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        if len({t.values[i] for t in trials}) == 1:
            shares[name] = {}  # an objective that never moved has nothing to attribute
            continue
        with warnings.catch_warnings():  # PED-ANOVA warns that it explains low values: the objectives are minimised
            warnings.simplefilter("ignore", UserWarning)
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=varied,
                target=lambda t, i=i: t.values[i], normalize=True)
        shares[name] = {param: float(value) for param, value in found.items()}
    return {"evaluator": "ped-anova", "trials": len(trials), "objectives": shares}


def record(store: Store, searches: list[tuple[int, str]], storage: optuna.storages.BaseStorage) -> None:
    """Compute and store the importance of each (search id, Optuna study name)."""
    for search_id, optuna_name in searches:
        try:
            study = optuna.load_study(study_name=optuna_name, storage=storage)
        except KeyError:  # a unit that never opened its study (no lr window): nothing was searched
            continue
        store.set_importance(search_id, importance(study))
