"""Recommendation, export and apply: the answer a model owner ships."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stored import check_every_trial_stored

from tuner.core.status import SCORED
from tuner.results.recommend import recommend_unit
from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))
TARGET = {"gap_tolerance": 0.05, "utility_tolerance": 0.5, "mia_tolerance": 0.1, "min_robustness": 0.5,
          "neighbourhood": 0.25}


def row(i, lr, epochs, gap, drop, status="completed"):
    return {"id": i, "number": i, "status": status, "params": {"lr": lr, "epochs": epochs},
            "metrics": {} if status == "diverged" else {"forget_gap": gap, "utility_drop": drop, "mia_auc": 0.5}}


def test_a_robust_setting_beats_an_isolated_lucky_one():
    rows = [row(1, 1e-3, 3, 0.01, 0.10), row(2, 1.2e-3, 3, 0.02, 0.12), row(3, 0.9e-3, 3, -0.03, 0.11),
            row(4, 1e-5, 1, 0.00, 0.01),  # lucky: in band, best utility, but alone among failures
            row(5, 1.2e-5, 1, -0.9, 0.0), row(6, 0.8e-5, 1, -0.8, 0.0)]
    rec = recommend_unit(rows, TARGET, band=())
    assert rec["status"] == "recommended" and rec["trial_id"] == 1
    assert rec["robustness"] > 0.5 and rec["window_width"] == pytest.approx(2.08, abs=0.01)
    assert rec["success_rate"] == pytest.approx(4 / 6)


def test_without_success_the_closest_is_named_with_its_reason():
    over = recommend_unit([row(1, 1e-2, 3, 0.8, 3.0), row(2, 1e-3, 2, 0.3, 1.0)], TARGET, band=())
    assert over["status"] == "closest" and over["trial_id"] == 2 and "over-unlearned" in over["reason"]
    under = recommend_unit([row(1, 1e-5, 1, -0.4, 0.0)], TARGET, band=())
    assert "under-unlearned" in under["reason"]
    dead = recommend_unit([row(1, 1e30, 1, 0, 0, status="diverged")], TARGET, band=())
    assert dead["status"] == "none" and "diverged" in dead["reason"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, local_ray, micro_study):
    """GA (at rates that diverge) and GA+GD, two trials each, no robustness checks: the study an export and an
    applied run are checked against."""
    tmp = tmp_path_factory.mktemp("tuned")
    url = micro_study(tmp, name="tuned", methods=["ga", "ga_gd"], budget={"trials": 2}, concurrency=2,
                      sampler={"name": "tpe", "n_startup_trials": 2},
                      search={"lr": {"low": 3e-4, "high": 2e-3}, "epochs": {"low": 1, "high": 3}},
                      # ga_gd's ranges reach the band at every setting (micro testbed, checked by hand): the
                      # tests need a recommendation whichever settings the sampler starts from
                      per_method={"ga": {"lr": {"low": 1e29, "high": 1e30}},
                                  "ga_gd": {"lr": {"low": 1e-3, "high": 2e-3}, "retain_weight": {"low": 2, "high": 4}}},
                      target={"gap_tolerance": 0.1},
                      run={"eval_every": 2})  # mid-run checkpoints to export
    return tmp, url


def test_the_tuned_study_stored_every_trial_with_its_curve_on_sqlite(tuned):
    """On PostgreSQL the same is checked in tests/test_study.py."""
    check_every_trial_stored(Store(tuned[1]), "tuned")


def cli(*args, cache_dir):
    return subprocess.run([TUNER, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TUNER_CACHE": str(cache_dir)})


def test_exported_recommendation_reproduces_its_metrics(tuned, cache_dir):
    tmp, url = tuned
    exported = tmp / "rec.yaml"
    proc = cli("export", "tuned", "--method", "ga_gd", "--storage", url, "-o", str(exported), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(exported.read_text())
    assert doc["config"]["method"] == "ga_gd" and doc["provenance"]["model"]["fingerprint"]["model_type"] == "gpt2"
    assert set(doc["provenance"]["data"]["sha256"]) >= {"forget", "unseen", "retain_in_distribution"}
    assert doc["provenance"]["versions"]["torch"] and doc["expected"]["forget_gap"]["n"] >= 1
    expected = {k: v["value"] for k, v in doc["expected"].items() if v["value"] is not None}
    assert {"forget_gap", "utility_drop", "forget_nll"} <= set(expected)
    out = tmp / "applied"
    proc = cli("unlearn", "--model", "testbed:micro", "--config", str(exported), "--out", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    applied = json.loads((out / "metrics.json").read_text())
    assert applied["selected_step"] == doc["step"]
    for key, value in expected.items():
        assert applied["metrics"][key] == pytest.approx(value, abs=0.01), key  # same seed, CPU
    assert (out / "model" / "config.json").exists()
    as_json = cli("export", "tuned", "--storage", url, "--format", "json", cache_dir=cache_dir)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["format"] == "unlearn-tuner/recommendation@2"


def test_the_pareto_front_is_made_of_candidates_and_a_mid_run_one_reproduces(tuned, cache_dir):
    """Every evaluated checkpoint competes: the stored front names (trial, step) pairs, and a checkpoint the
    trial did not keep, exported and applied, ends at that step with that step's metrics."""
    tmp, url = tuned
    store = Store(url)
    curves = store.study_curves(store.study("tuned").id)
    rows = {r["id"]: r for r in store.trials("tuned") if r["unit"] == "ga_gd@in_distribution"}
    front = [(tid, p["step"]) for tid in rows for p in curves.get(tid, []) if p["pareto"]]
    assert front and all(rows[tid]["pareto"] for tid, _ in front)
    kept = {tid: rows[tid]["result"]["selected_step"] for tid in rows}
    trial, point = next((tid, p) for tid in rows for p in curves.get(tid, []) if 0 < p["step"] != kept[tid])
    exported = tmp / "mid.yaml"
    proc = cli("export", "tuned", "--trial", str(trial), "--step", str(point["step"]), "--storage", url,
               "-o", str(exported), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(exported.read_text())
    assert doc["step"] == point["step"] and doc["config"]["end_step"] == point["step"]
    out = tmp / "mid-applied"
    proc = cli("unlearn", "--model", "testbed:micro", "--config", str(exported), "--out", str(out), cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    applied = json.loads((out / "metrics.json").read_text())
    assert applied["steps_done"] == point["step"] == applied["selected_step"]
    # the point's figures are screening estimates (subsampled, with standard errors) or whole-set values; the
    # applied run scores every block, so it agrees within the estimate's error
    for key in ("forget_gap", "forget_nll", "unseen_nll", "retain_nll"):
        if point[key] is None:
            continue  # a point where utility was not scored
        se = point.get(f"{key}_se") or 0.0
        assert applied["metrics"][key] == pytest.approx(point[key], abs=0.01 + 4 * se), key
    bad = cli("export", "tuned", "--trial", str(trial), "--step", "99999", "--storage", url, cache_dir=cache_dir)
    assert bad.returncode == 2 and "no evaluated checkpoint at step 99999" in bad.stderr


def test_bad_export_and_apply_inputs(tuned, cache_dir, bench):
    tmp, url = tuned
    cases = [
        (("export", "nope", "--storage", url), "no study named 'nope'"),
        (("export", "tuned", "--method", "ga", "--storage", url), "method 'ga' has no finished trials to export"),
        (("export", "tuned", "--method", "zzz", "--storage", url), "has no method 'zzz'"),
        (("export", "tuned", "--storage", url, "-o", str(tmp / "missing" / "r.yaml")), "does not exist"),
    ]
    for args, message in cases:
        proc = cli(*args, cache_dir=cache_dir)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert not (tmp / "missing").exists()
    # a configuration tuned on one architecture is refused for another
    exported = tmp / "rec2.yaml"
    assert cli("export", "tuned", "--storage", url, "-o", str(exported), cache_dir=cache_dir).returncode == 0
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp / "other-model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bench.tokenizer), n_embd=32, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(other)
    bench.tokenizer.save_pretrained(other)
    data = bench.source.testbed_root / "data"
    proc = cli("unlearn", "--model", str(other), "--config", str(exported), "--forget", str(data / "forget"),
               "--unseen", str(data / "unseen"), "--block-size", "32", "--out", str(tmp / "o"), cache_dir=cache_dir)
    assert proc.returncode == 2 and "was tuned for model 'testbed:micro'" in proc.stderr
    assert not (tmp / "o").exists()


def test_the_recommendation_is_stored_with_the_study(tuned):
    from tuner.results import derived
    from tuner.results.recommend import recommend

    _, url = tuned
    store = Store(url)
    stored = store.recommendations("tuned")  # the study driver stored it as the study ended
    assert set(stored) == {"ga", "ga_gd@in_distribution", None}
    rows = store.trials("tuned")
    rec = recommend(rows, store.study("tuned").spec["target"], band=())  # a pure function of the rows
    assert stored[None]["trial_id"] == rec["overall"]["trial_id"]
    derived.refresh(store, "tuned")  # deriving again replaces, never duplicates
    assert set(store.recommendations("tuned")) == set(stored)
    front = [r for r in rows if r["pareto"]]
    assert front and all(r["status"] in SCORED for r in front)
    assert stored["ga"]["status"] == "none" and "diverged" in stored["ga"]["reason"]


def test_muse_rule_keeps_each_trials_first_checkpoint_that_reaches_the_band():
    """`target.candidates: first_at_target` (MUSE's selection): of a trial's checkpoints only the first one in
    the band competes, even when a later one scores better; by default every checkpoint competes."""
    def point(step, gap, drop, selected=False):
        return {"id": 1, "number": 1, "status": "completed", "params": {"lr": 1e-3, "epochs": 2}, "step": step,
                "selected": selected, "metrics": {"forget_gap": gap, "utility_drop": drop}}

    rows = [point(2, -0.3, 0.05), point(4, -0.04, 0.4), point(6, 0.0, 0.1, selected=True)]
    assert recommend_unit(rows, TARGET | {"utility_tolerance": 1.0}, band=())["step"] == 6
    muse = recommend_unit(rows, TARGET | {"utility_tolerance": 1.0, "candidates": "first_at_target"}, band=())
    assert muse["step"] == 4 and muse["n_candidates"] == 1
    kept_first = [point(2, -0.3, 0.05), point(4, 0.0, 0.4, selected=True), point(6, 0.02, 0.1)]
    assert recommend_unit(kept_first, TARGET | {"utility_tolerance": 1.0, "candidates": "first_at_target"},
                          band=())["step"] == 4
