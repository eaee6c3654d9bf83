"""Cheap screening: curve points score utility on a seeded subsample, with the standard error of each
subsampled figure; the kept checkpoint is scored in full; evaluation batches come from the memory plan."""

from __future__ import annotations

import math

import torch

from tuner.engine.evaluation import Screening, sample_se
from tuner.engine.memory import ModelShape, RunShape, eval_batch, plan
from tuner.results.candidates import candidates
from tuner.store import Store

CPU = torch.device("cpu")


def test_the_standard_error_is_that_of_a_sample_without_replacement():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(sample_se(values, 1000), float(values.std()) / 2 * math.sqrt(996 / 999), rel_tol=1e-6)
    assert sample_se(values, 4) == 0.0  # the whole population: no sampling error
    assert sample_se(values[:1], 10) is None  # one block says nothing about the spread


def test_a_subsampled_point_carries_its_errors_and_a_whole_set_none(bench, data):
    retain_blocks = data.eval_sets()["retain"].shape[0]
    assert retain_blocks > 4  # the test means something: the subsample is smaller than the set
    screening = Screening(data, 4, 0, 8, CPU, torch.float32)
    start, start_tokens = screening.start(bench.reference)
    assert start["retain_nll_se"] > 0 and start["utility_drop_se"] == 0.0  # step 0 against itself
    assert start_tokens == sum(int(screening.sets[n].numel()) for n in ("general", "retain"))
    point, tokens = screening.point(bench.fresh(), utility=True)
    assert {"forget_gap", "retain_nll", "retain_nll_se", "general_nll_se", "utility_drop_se"} <= point.keys()
    assert "forget_nll_se" not in point  # forget and unseen are scored whole
    assert screening.describe() == {"general": [4, data.eval_sets()["general"].shape[0]],
                                    "retain": [4, retain_blocks]}
    gap_only, gap_tokens = screening.point(bench.fresh(), utility=False)
    assert set(gap_only) == {"forget_nll", "unseen_nll", "forget_gap"} and gap_tokens < tokens
    whole = Screening(data, None, 0, 8, CPU, torch.float32)
    assert whole.start(bench.reference) == ({}, 0) and whole.describe() == {}
    assert not any(k.endswith("_se") for k in whole.point(bench.fresh(), utility=True)[0])


def test_the_error_covers_the_full_measurement(unlearn):
    """A trial's subsampled utility drop lies within a few standard errors of the drop scored on every block."""
    run = dict(method="ga", lr=2e-3, max_steps=6, eval_every=6, stop_at_target=False, checkpoint="last",
               eval_utility_every=1)
    light = unlearn(**run, eval_utility_blocks=6)
    full = unlearn(**run, eval_utility_blocks=None)
    estimate, exact = light.curve[-1], full.curve[-1]
    drop = estimate["retain_nll"] - light.curve[0]["retain_nll"]
    exact_drop = exact["retain_nll"] - full.curve[0]["retain_nll"]
    assert exact_drop > 0.05  # the run moved utility: there is something to estimate
    assert abs(drop - exact_drop) <= 4 * estimate["utility_drop_se"] + 1e-6
    assert light.subsampled and not full.subsampled
    assert light.metrics["utility_drop"] == full.metrics["utility_drop"]  # the kept checkpoint: scored in full


def test_estimated_candidates_carry_their_errors_through_the_store(store_url):
    store = Store(store_url)
    study = store.create_study("s", "testbed:micro", 0, {"name": "s"}, "name: s\n", {})
    search = store.ensure_search(study, "ga_gd@general", "ga_gd", "general", "s/ga_gd@general", "tpe", 3, {})
    trial = store.start_trial(search, {"lr": 1e-3})
    store.add_curve_point(trial, {"step": 0, "forget_gap": -1.0, "forget_nll": 4, "unseen_nll": 5,
                                  "retain_nll": 3.0, "retain_nll_se": 0.02, "utility_drop_se": 0.0})
    store.add_curve_point(trial, {"step": 2, "forget_gap": -0.05, "forget_nll": 4.95, "unseen_nll": 5,
                                  "retain_nll": 3.2, "retain_nll_se": 0.03, "utility_drop_se": 0.04})
    store.add_curve_point(trial, {"step": 4, "forget_gap": 0.3, "forget_nll": 5.3, "unseen_nll": 5})
    curve = store.curve(trial)
    assert curve[1]["utility_drop_se"] == 0.04 and curve[2]["utility_drop_se"] is None
    row = {"id": trial, "status": "completed", "metrics": {"forget_gap": 0.3, "utility_drop": 0.5},
           "result": {"selected_step": 4, "subsampled": {"retain": [6, 40]}}}
    mid = [c for c in candidates([row], {trial: curve}, ["forget_gap", "utility_drop"]) if c["step"] == 2]
    assert mid[0]["measured"] == "estimate" and mid[0]["errors"] == {"retain_nll": 0.03, "utility_drop": 0.04}
    assert math.isclose(mid[0]["metrics"]["utility_drop"], 0.2)
    whole = {**row, "result": {"selected_step": 4, "subsampled": {}}}
    mid = [c for c in candidates([whole], {trial: curve}, ["forget_gap", "utility_drop"]) if c["step"] == 2]
    assert mid[0]["estimated"] == [] and mid[0]["errors"] == {}


def test_the_eval_batch_fills_the_training_activations_and_stays_in_bounds():
    llama_1b = ModelShape(params=1_235_814_400, hidden=2048, intermediate=8192, layers=16, vocab=128256)
    full = RunShape(precision="mixed", batch_size=8, block_size=2048, streams=2)
    assert eval_batch(llama_1b, full) == 64  # plenty of activation memory: capped
    checkpointed = RunShape(precision="mixed", batch_size=1, block_size=2048, streams=2,
                            gradient_checkpointing=True)
    small = eval_batch(llama_1b, checkpointed)
    assert 1 < small < 64
    # what the chosen batch holds without a graph fits in the training step's activations
    assert small * 2048 * (8 * 2048 + 3 * 8192) * 2 <= plan(llama_1b, checkpointed).parts["activations"]
    tiny = RunShape(precision="fp32", batch_size=4, block_size=64, streams=1, gradient_checkpointing=True)
    assert eval_batch(ModelShape(params=10**6, hidden=64, intermediate=256, layers=1, vocab=512), tiny) >= 4
