"""Robustness checks on the real micro testbed: a relearning attack, the exact-retrain reference, quantization."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tuner.engine import robustness as rb

CPU = torch.device("cpu")
# The micro testbed was pre-trained at lr 3e-3: an attack at the 7B default (1e-5) would not move it in a few steps.
ATTACK = dict(steps=5, lr=1e-3, batch_size=8, eval_every=5, seed=0, device="cpu", eval_batch_size=64)


@pytest.fixture(scope="module")
def unlearned(bench, data, baseline):
    """(model, result) of a GA run that still remembers (forget gap < 0). A copy: the workbench reuses its
    trainee for the next run."""
    from tuner.core.precision import resolve_precision
    from tuner.engine.unlearn import UnlearnConfig, run_unlearning

    cfg = UnlearnConfig(method="ga", lr=1e-3, max_steps=6, stop_at_target=False, checkpoint="last", device="cpu",
                        eval_every=6, eval_batch_size=64)
    model, reference = bench.trainee(cfg, resolve_precision(cfg.precision, CPU))
    result = run_unlearning(model, data, cfg, reference=reference, baseline=baseline)
    assert result.metrics is not None
    return copy.deepcopy(model).eval(), result


@pytest.fixture(scope="module")
def attacked(unlearned, data):
    model, _ = unlearned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = rb.relearn(model, data, **ATTACK)
    return out, before


def test_relearning_brings_the_forget_text_back_without_touching_the_candidate(unlearned, attacked, data):
    model, result = unlearned
    out, before = attacked
    assert out["relearn_drop"] > 0.05  # the held-out forget half got more likely
    assert out["curve"][-1]["forget_nll"] < out["curve"][0]["forget_nll"]
    assert [p["step"] for p in out["curve"]] == [0, 5] and out["steps_done"] == 5 and not out["diverged"]
    n = data.forget.shape[0]
    assert out["attack_blocks"] + out["eval_blocks"] == n and out["eval_blocks"] >= n // 2 - 1
    # the gap is the study's definition, on the slice the attack never trained on
    assert out["relearn_gap_before"] == pytest.approx(out["curve"][0]["forget_nll"] - out["curve"][0]["unseen_nll"])
    assert out["relearn_gap_before"] < 0  # the GA run still remembers, as its own forget gap says
    assert result.metrics["forget_gap"] < 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())  # no gradients left on it either


def test_settings_are_the_attack_arguments():
    import inspect

    assert set(rb.RelearnSettings().model_dump()) <= set(inspect.signature(rb.relearn).parameters)


def test_forget_split_is_fixed_and_disjoint():
    a1, e1 = rb.forget_split(10, 0.5, seed=3)
    a2, e2 = rb.forget_split(10, 0.5, seed=3)
    assert torch.equal(a1, a2) and torch.equal(e1, e2)
    assert sorted(torch.cat([a1, e1]).tolist()) == list(range(10)) and len(a1) == 5
    with pytest.raises(Exception, match="at least 2 forget blocks"):
        rb.forget_split(1)


def test_retain_text_attack_is_measured_on_the_same_slice(unlearned, attacked, data):
    model, _ = unlearned
    out = rb.relearn(model, data, **{**ATTACK, "steps": 2, "eval_every": 2, "source": "retain"})
    assert out["attack_blocks"] == data.retain_train["in_distribution"].shape[0]
    assert out["eval_blocks"] == attacked[0]["eval_blocks"]
    assert out["relearn_gap_before"] == pytest.approx(attacked[0]["relearn_gap_before"])


def test_unlearned_model_relearns_faster_than_the_exact_retrain_model(bench, data, attacked):
    retrain = rb.load_exact_retrain(bench.source.retrain_path)
    reference = rb.relearn(retrain, data, **ATTACK)  # once per study in a real one
    assert not any(p.requires_grad for p in retrain.parameters())  # the reference is left as loaded
    candidate_drop, retrain_drop = attacked[0]["relearn_drop"], reference["relearn_drop"]
    assert retrain_drop > 0  # the attack teaches even a model that never saw the text
    ratio = rb.relearn_speed_ratio(candidate_drop, retrain_drop)
    assert ratio == pytest.approx(candidate_drop / retrain_drop)
    assert ratio > 2  # GA suppressed the text: it comes back several times faster than it can be learned afresh
    assert math.isnan(rb.relearn_speed_ratio(candidate_drop, 0.0))


def test_quantization_moves_the_forget_gap_and_4_bits_more_than_8(unlearned, data, baseline):
    model, result = unlearned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = rb.quantized_metrics(model, data, (4, 8), baseline=baseline, unquantized=result.metrics,
                               device="cpu", eval_batch_size=64)
    assert out["quant4_layers"] == out["quant8_layers"] == 8  # 2 blocks x (qkv, attn out, mlp in, mlp out)
    assert out["quant4_gap_shift"] != 0
    assert abs(out["quant8_gap_shift"]) < abs(out["quant4_gap_shift"])
    assert out["quant4_gap"] == pytest.approx(result.metrics["forget_gap"] + out["quant4_gap_shift"])
    assert out["quant4_utility_drop"] == pytest.approx(out["quant4_retain_nll"] - baseline["retain_nll"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the copy was converted, not the model


def test_seed_spread():
    runs = [{"forget_gap": -0.1, "utility_drop": 0.2}, {"forget_gap": 0.1, "utility_drop": 0.4}, None,
            {"forget_gap": math.nan, "utility_drop": 0.0}]
    out = rb.seed_spread(runs)
    assert out["n"] == 2 and out["n_failed"] == 2
    assert out["forget_gap_mean"] == pytest.approx(0.0) and out["forget_gap_spread"] == pytest.approx(0.2)
    assert out["utility_drop_std"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(rb.seed_spread(runs[:1])["forget_gap_std"])
