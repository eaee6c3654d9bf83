"""A study of two added methods, end to end: their own hyperparameters are searched by Optuna, stored with the
trials, drawn on the dashboard's axes and columns, exported, and the export reproduces its trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tuner.core.status import SCORED
from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))
OWN = {"npo": {"beta"}, "rmu": {"layer", "steering_coeff", "alpha"}}


@pytest.fixture(scope="module")
def study(tmp_path_factory, local_ray, micro_study):
    tmp = tmp_path_factory.mktemp("own-knobs")
    url = micro_study(tmp, name="own-knobs", methods=["npo", "rmu"], budget={"trials": 2}, concurrency=2,
                      sampler={"name": "tpe", "n_startup_trials": 2},
                      search={"lr": {"low": 1e-3, "high": 3e-3}, "epochs": {"low": 1, "high": 2}},
                      per_method={"rmu": {"layer": {"low": 0, "high": 1}, "steering_coeff": {"low": 1, "high": 10},
                                          "alpha": {"low": 1, "high": 100}},
                                  "npo": {"beta": {"low": 0.05, "high": 0.5}}},
                      target={"gap_tolerance": 0.1})
    return tmp, url


def test_their_own_hyperparameters_are_searched_and_stored(study):
    _, url = study
    store = Store(url)
    rows = store.trials("own-knobs")
    assert {r["unit"] for r in rows} == {"npo@in_distribution", "rmu@in_distribution"}
    for row in rows:
        method = row["method"]
        assert OWN[method] <= set(row["params"]), row["params"]
        assert row["status"] in SCORED, row["error"]
    layers = [r["params"]["layer"] for r in rows if r["method"] == "rmu"]
    assert all(layer in (0, 1) for layer in layers)
    betas = [r["params"]["beta"] for r in rows if r["method"] == "npo"]
    assert all(0.05 <= b <= 0.5 for b in betas)
    ot = optuna.load_study(study_name="own-knobs/npo@in_distribution", storage=store.url)
    assert all("beta" in t.distributions for t in ot.trials)  # Optuna chose β, with its declared scale
    assert ot.trials[0].distributions["beta"].log


def test_the_dashboard_draws_them_on_axes_and_columns(study):
    from dashboards import figures
    from dashboards.data import load_study, table_columns

    _, url = study
    data = load_study(Store(url), "own-knobs")
    fig = figures.robustness(data).to_plotly_json()
    rows_drawn = {(t["meta"]["unit"], t["meta"]["y"]) for t in fig["data"] if (t.get("meta") or {}).get("role") == "trials"}
    assert ("npo@in_distribution", "beta") in rows_drawn
    assert {("rmu@in_distribution", k) for k in OWN["rmu"]} <= rows_drawn
    headers = {c.key for c in table_columns(data)}
    assert {"beta", "layer", "steering_coeff", "alpha"} <= headers


def test_the_export_of_an_npo_trial_reproduces_it(study, cache_dir):
    tmp, url = study
    env = {**os.environ, "TUNER_CACHE": str(cache_dir)}
    exported = tmp / "npo.yaml"
    proc = subprocess.run([TUNER, "export", "own-knobs", "--method", "npo", "--storage", url, "-o", str(exported)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(exported.read_text())
    assert doc["config"]["method"] == "npo" and "beta" in doc["config"]["params"]
    expected = {k: v["value"] for k, v in doc["expected"].items() if v["value"] is not None}
    out = tmp / "applied"
    proc = subprocess.run([TUNER, "unlearn", "--model", "testbed:micro", "--config", str(exported), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    applied = json.loads((out / "metrics.json").read_text())
    assert applied["config"]["params"]["beta"] == doc["config"]["params"]["beta"]
    for key in ("forget_gap", "forget_nll", "utility_drop"):
        assert applied["metrics"][key] == pytest.approx(expected[key], abs=0.01), key
