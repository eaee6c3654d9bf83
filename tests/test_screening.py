"""Cheap screening: curve points score utility on a seeded subsample, with the standard error of each
subsampled figure; the kept checkpoint is scored in full; evaluation batches come from the memory plan."""

from __future__ import annotations

import math

import pytest
import torch

from tuner.core.status import STOPPED_AT_TARGET
from tuner.engine.evaluation import Screening, sample_se
from tuner.engine.memory import ModelShape, RunShape, eval_batch, plan
from tuner.engine.stopping import CONFIRM_SE, is_estimate, reached
from tuner.results.candidates import candidates
from tuner.store import Store

CPU = torch.device("cpu")


def test_the_standard_error_is_that_of_a_sample_without_replacement():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(sample_se(values, 1000), float(values.std()) / 2 * math.sqrt(996 / 999), rel_tol=1e-6)
    assert sample_se(values, 4) == 0.0  # the whole population: no sampling error
    assert sample_se(values[:1], 10) is None  # one block says nothing about the spread


def test_a_subsampled_point_is_a_difference_estimate_with_its_errors(bench, data, baseline):
    sizes = {name: blocks.shape[0] for name, blocks in data.eval_sets().items()}
    assert min(sizes.values()) > 4  # the test means something: every subsample is smaller than its set
    screening = Screening(data, 4, 4, 0, 8, CPU, torch.float32)
    tokens = screening.start(bench.reference, baseline)
    assert tokens == 4 * 4 * data.block_size
    # the model as it started: every estimate is the whole set's value, with no spread of changes
    same, _ = screening.point(bench.reference, utility=True)
    for name in sizes:
        assert math.isclose(same[f"{name}_nll"], baseline[f"{name}_nll"], abs_tol=1e-5)
        assert same[f"{name}_nll_se"] < 1e-5
    point, tokens = screening.point(bench.fresh(), utility=True)
    assert {"forget_gap", "forget_gap_se", "retain_nll_se", "general_nll_se", "utility_drop_se"} <= point.keys()
    assert math.isclose(point["forget_gap_se"], math.hypot(point["forget_nll_se"], point["unseen_nll_se"]))
    assert point["utility_drop_se"] == point["retain_nll_se"]
    assert screening.describe() == {name: [4, n] for name, n in sorted(sizes.items())}
    gap_only, gap_tokens = screening.point(bench.fresh(), utility=False)
    assert set(gap_only) == {"forget_nll", "unseen_nll", "forget_gap", "forget_nll_se", "unseen_nll_se",
                             "forget_gap_se"} and gap_tokens < tokens
    whole = Screening(data, None, None, 0, 8, CPU, torch.float32)
    assert whole.start(bench.reference, baseline) == 0 and whole.describe() == {}
    assert not any(k.endswith("_se") for k in whole.point(bench.fresh(), utility=True)[0])


def test_the_estimates_cover_the_whole_sets(unlearn):
    """A trial's subsampled figures lie within a few standard errors of the same figures scored on every
    block, and the kept checkpoint is scored on every block either way."""
    run = dict(method="ga", lr=2e-3, max_steps=6, eval_every=6, stop_at_target=False, checkpoint="last",
               eval_utility_every=1)
    light = unlearn(**run, eval_gap_blocks=8, eval_utility_blocks=8)
    full = unlearn(**run, eval_gap_blocks=None, eval_utility_blocks=None)
    estimate, exact = light.curve[-1], full.curve[-1]
    assert exact["retain_nll"] - full.curve[0]["retain_nll"] > 0.05  # the run moved: there is something to estimate
    for key, se in (("forget_gap", "forget_gap_se"), ("retain_nll", "retain_nll_se"),
                    ("general_nll", "general_nll_se")):
        assert abs(estimate[key] - exact[key]) <= 4 * estimate[se] + 1e-6, key
    assert set(light.subsampled) == {"forget", "general", "retain", "unseen"} and not full.subsampled
    assert light.metrics == full.metrics  # the kept checkpoint: scored in full
    assert light.eval_tokens < full.eval_tokens


def test_a_stop_rests_on_whole_set_figures(unlearn):
    """An estimate that would end the run (or is within CONFIRM_SE standard errors of doing so) is scored again
    on every block: the run stops at a whole-set point, the kept checkpoint's measured gap, and every estimate
    before it was clearly short of the target."""
    run = unlearn(method="ga_gd", lr=1e-3, max_steps=20, eval_every=1, stop_at_target=True, checkpoint="last",
                  eval_gap_blocks=4, eval_utility_blocks=4)
    assert run.status == STOPPED_AT_TARGET and run.subsampled
    stop = run.curve[-1]
    assert not is_estimate(stop) and reached(stop)
    assert stop["forget_gap"] == pytest.approx(run.metrics["forget_gap"], abs=1e-5)
    earlier = run.curve[1:-1]
    assert any(is_estimate(p) for p in earlier)  # screening ran before the stop
    for p in earlier:
        assert (is_estimate(p) and not reached(p, CONFIRM_SE)) or (not is_estimate(p) and not reached(p)), p


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
