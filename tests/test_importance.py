"""Parameter importance per objective: PED-ANOVA over a unit's finished trials, from a real Optuna study in
the store's database, stored with the search and read back by `tuner study show` and the study page."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from dashboards.page import importance_text
from tuner.store import Store
from tuner.study.importance import MIN_TRIALS, importance, record
from tuner.study.search import optuna_storage

TUNER = str(Path(sys.executable).with_name("tuner"))


def ask_tell(study: optuna.Study, n: int, values) -> None:
    """n trials over lr (log) and epochs, told `values(lr, epochs)`."""
    for _ in range(n):
        trial = study.ask()
        lr, epochs = trial.suggest_float("lr", 1e-5, 1e-2, log=True), trial.suggest_int("epochs", 1, 5)
        study.tell(trial, values(lr, epochs))


def new_study(storage=None, name: str = "unit") -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["forget_gap", "utility_drop"])
    return study


def test_each_objective_names_the_parameter_that_moved_it():
    """The gap objective depends on the lr only and the utility objective on the epochs only: each objective's
    largest share goes to its own parameter, and the shares of an objective sum to 1."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = new_study()
    ask_tell(study, 12, lambda lr, epochs: (abs(math.log10(lr) + 3.0), float(epochs)))
    found = importance(study)
    assert found["evaluator"] == "ped-anova" and found["trials"] == 12
    gap, drop = found["objectives"]["forget_gap"], found["objectives"]["utility_drop"]
    assert max(gap, key=gap.get) == "lr" and max(drop, key=drop.get) == "epochs"
    for shares in (gap, drop):
        assert sum(shares.values()) == pytest.approx(1.0)
    assert importance_text(found).startswith("forget_gap: lr ")


def test_too_few_trials_or_nothing_varied_is_said_not_guessed():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    few = new_study()
    ask_tell(few, MIN_TRIALS - 1, lambda lr, epochs: (lr, epochs))
    assert importance(few) == {"trials": MIN_TRIALS - 1,
                               "note": f"needs at least {MIN_TRIALS} finished trials ({MIN_TRIALS - 1} so far)"}
    fixed = new_study()
    for _ in range(MIN_TRIALS):
        trial = fixed.ask()
        trial.suggest_float("lr", 1e-3, 1e-3)
        fixed.tell(trial, (0.1, 0.2))
    assert importance(fixed)["note"] == "no hyperparameter took more than one value"
    assert importance_text(importance(fixed)) == "no hyperparameter took more than one value"
    flat = new_study()  # the utility objective never moves: no share is made up for it
    ask_tell(flat, MIN_TRIALS + 2, lambda lr, epochs: (abs(math.log10(lr) + 3.0), 0.5))
    found = importance(flat)
    assert found["objectives"]["utility_drop"] == {} and found["objectives"]["forget_gap"]
    assert "utility_drop: did not vary" in importance_text(found)


def test_the_record_is_stored_with_its_search(store_url):
    """On SQLite and PostgreSQL: the Optuna study in the store's database is read, the record stored with its
    search, and a unit whose study was never opened (not searched) gets none."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = Store(store_url)
    study_id = store.create_study("imp", "testbed:micro", 0, {"objectives": ["forget_gap", "utility_drop"]}, "", {})
    search_id = store.ensure_search(study_id, "ga_gd", "ga_gd", None, "imp/ga_gd", "random", 8, {})
    storage = optuna_storage(store)
    ask_tell(new_study(storage, "imp/ga_gd"), 8, lambda lr, epochs: (abs(math.log10(lr) + 3.0), float(epochs)))
    record(store, [(search_id, "imp/ga_gd"), (search_id + 1000, "never-opened")], storage)
    stored = store.importances("imp")
    assert list(stored) == ["ga_gd"] and stored["ga_gd"]["trials"] == 8
    assert set(stored["ga_gd"]["objectives"]) == {"forget_gap", "utility_drop"}
    shown = subprocess.run([TUNER, "study", "show", "imp", "--storage", store_url], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "parameter importance per objective" in shown.stdout
    gap_row = next(line for line in shown.stdout.splitlines() if "forget_gap" in line and "ga_gd" in line)
    top = next(iter(stored["ga_gd"]["objectives"]["forget_gap"]))
    assert f"{top} {stored['ga_gd']['objectives']['forget_gap'][top]:.2f}" in gap_row
