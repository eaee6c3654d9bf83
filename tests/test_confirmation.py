"""A recommendation from a mid-run checkpoint whose utility the trial only estimated (screening:
`eval_utility_every: 3` on a 4-block subsample) is confirmed by a re-run scored in full before it is shown,
and what export promises is what applying it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuner.core.status import SCORED
from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))


def cli(*args, cache_dir):
    return subprocess.run([TUNER, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TUNER_CACHE": str(cache_dir)})


@pytest.fixture(scope="module")
def screened(tmp_path_factory, local_ray, micro_study):
    tmp = tmp_path_factory.mktemp("screened")
    url = micro_study(tmp, name="screened", budget={"trials": 3}, concurrency=2,
                      sampler={"name": "tpe", "n_startup_trials": 3},
                      search={"lr": {"low": 1e-3, "high": 3e-3}, "epochs": {"low": 3, "high": 3}},
                      target={"gap_tolerance": 0.1},
                      # the selected checkpoint is the last step, past the band: the picks are mid-run points
                      run={"eval_every": 2, "eval_utility_every": 3, "eval_utility_blocks": 4,
                           "stop_at_target": False, "checkpoint": "last"})
    return tmp, url


@pytest.mark.timeout(1500)  # a study, a confirmation and an applied run on the CPU
def test_a_mid_run_pick_is_confirmed_and_export_matches_the_applied_run(screened, cache_dir):
    tmp, url = screened
    store = Store(url)
    overall = store.recommendation("screened")["overall"]
    assert overall["status"] == "recommended", overall
    assert not overall["selected"] and overall["measured"] == "confirmed", overall
    assert "re-running" in overall["reason"]
    check = store.study_checks("screened")[(overall["trial_id"], overall["step"])]
    assert check["details"]["confirmation"]["status"] in SCORED
    assert {"retain_nll", "general_nll", "mia_auc", "utility_drop"} <= set(check["metrics"])
    exported = tmp / "rec.yaml"
    proc = cli("export", "screened", "--storage", url, "-o", str(exported), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(exported.read_text())
    assert doc["measured"]["how"] == "confirmed" and "forget_gap" in doc["measured"]["estimate_replaced"]
    assert doc["config"]["end_step"] == overall["step"]
    out = tmp / "applied"
    proc = cli("unlearn", "--model", "testbed:micro", "--config", str(exported), "--out", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    applied = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("forget_gap", "utility_drop"):
        assert applied[key] == pytest.approx(doc["expected"][key]["value"], abs=1e-3), key
