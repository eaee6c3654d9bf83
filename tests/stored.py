"""What every finished study of a diverging GA unit and a working GA+GD unit must have stored: shared by the
study tests on PostgreSQL (tests/test_study.py) and on SQLite (the `tuned` study of tests/test_recommend.py)."""

from __future__ import annotations

import optuna

from tuner.core.status import SCORED
from tuner.store import Store
from tuner.study.orchestrator import pareto_sizes


def check_study(store: Store, name: str, units: list[str], budget: int) -> list[dict]:
    """Each unit holds `budget` finished trials, numbered apart; returns the study's rows."""
    rows = store.trials(name)
    assert sorted({r["unit"] for r in rows}) == sorted(units)
    for unit in units:
        done = [r for r in rows if r["unit"] == unit and r["status"] != "interrupted"]
        assert len(done) == budget, (unit, [r["status"] for r in rows])
        assert len({r["number"] for r in done}) == budget
    return rows


def check_every_trial_stored(store: Store, name: str) -> None:
    """Two trials per unit: GA's diverged (recorded, not fatal), GA+GD's scored with their curves and
    objectives; the study's baseline and exact retrain; Optuna told COMPLETE and FAIL; a Pareto front."""
    rows = check_study(store, name, ["ga", "ga_gd@in_distribution"], 2)
    ga = [r for r in rows if r["unit"] == "ga"]
    assert all(r["status"] == "diverged" and "non-finite" in r["error"] for r in ga)
    for r in (r for r in rows if r["unit"] == "ga_gd@in_distribution"):
        assert r["status"] in SCORED
        assert r["metrics"]["forget_nll"] > 0 and r["effective_batch"] == 8 and r["world_size"] == 1
        assert len(store.curve(r["id"])) >= 2
        assert set(r["objectives"]) == {"forget_gap", "utility_drop"}
    study = store.study(name)
    assert study.status == "finished" and study.baseline["forget_gap"] < 0
    assert study.exact_retrain["forget_nll"] > study.baseline["forget_nll"]
    ot = optuna.load_study(study_name=f"{name}/ga_gd@in_distribution", storage=store.url)
    assert [t.state for t in ot.trials].count(optuna.trial.TrialState.COMPLETE) == 2
    assert all(len(t.values) == 2 for t in ot.trials)
    failed = optuna.load_study(study_name=f"{name}/ga", storage=store.url).trials
    assert [t.state for t in failed] == [optuna.trial.TrialState.FAIL] * 2
    assert pareto_sizes(store, name)["ga_gd@in_distribution"] >= 1
