"""The metrics mean what the brief says."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuner.engine.evaluation import auc, curve_sets, full_metrics, mia_scores, token_nll


def test_auc_matches_its_definition():
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


def test_batched_token_nll_equals_the_models_own_loss(bench, data):
    blocks = data.forget[:5]
    ours = token_nll(bench.reference, blocks, 2, torch.device("cpu"))
    with torch.no_grad():
        hf = bench.reference(input_ids=blocks, labels=blocks).loss
    assert ours.shape == (5, blocks.shape[1] - 1)
    assert torch.allclose(ours.mean(), hf, atol=1e-5)


def test_mink_score_uses_the_least_likely_tokens():
    nll = torch.tensor([[0.1] * 9 + [3.0], [0.5] * 10])
    scores = mia_scores(nll, None)
    # block 0 has a lower mean NLL but one very unlikely token: Min-K% ranks it as less member-like
    assert scores["loss"][0] > scores["loss"][1]
    assert scores["mink"][0] < scores["mink"][1]


def test_original_testbed_model_remembers_its_forget_set(baseline):
    assert baseline["forget_gap"] < 0
    assert baseline["mia_auc"] > 0.6
    assert set(baseline) >= {"forget_nll", "unseen_nll", "retain_nll", "general_nll", "mia_auc_loss",
                             "mia_auc_zlib", "mia_auc_mink", "forget_ppl"}


def test_utility_drop_is_zero_for_the_original(bench, data, baseline):
    again = full_metrics(bench.reference, data, 16, torch.device("cpu"), torch.float32, baseline)
    assert abs(again["utility_drop"]) < 1e-6 and abs(again["general_utility_drop"]) < 1e-6


def test_token_nll_is_exact_in_fp32_against_the_full_logits(bench, data):
    """Chunked through the head, batched, one transfer: the same per-token NLL as the full logits."""
    blocks = data.unseen[:7]
    with torch.no_grad():
        logits = bench.reference(input_ids=blocks).logits[:, :-1]
        expected = F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:], reduction="none")
    ours = token_nll(bench.reference, blocks, 3, torch.device("cpu"))
    assert ours.device.type == "cpu" and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)


def test_utility_subsample_is_fixed_and_curve_sets_keep_forget_and_unseen_whole(data):
    sets = curve_sets(data, utility=True, utility_blocks=3, seed=7)
    assert torch.equal(sets["forget"], data.eval_sets()["forget"]) and torch.equal(sets["unseen"], data.unseen)
    assert sets["retain"].shape[0] == 3 and sets["general"].shape[0] == 3
    assert torch.equal(curve_sets(data, True, 3, seed=7)["retain"], sets["retain"])
    assert set(curve_sets(data, utility=False)) == {"forget", "unseen"}


def test_a_lighter_evaluation_schedule_keeps_the_selected_step_and_final_metrics(unlearn):
    """Utility at every 2nd curve point on 4 blocks per set selects the same checkpoint and reports the
    same final metrics as scoring everything at every point, for fewer evaluated tokens."""
    run = dict(method="ga_gd", lr=1e-3, max_steps=6, eval_every=1, stop_at_target=False, checkpoint="best")
    full = unlearn(**run, eval_utility_every=1, eval_utility_blocks=None)
    light = unlearn(**run, eval_utility_every=2, eval_utility_blocks=4)
    assert 0 < full.selected_step < 6  # the test means something: the best point is not simply the last
    assert light.selected_step == full.selected_step
    assert light.metrics.keys() == full.metrics.keys()
    for key, value in full.metrics.items():
        assert abs(light.metrics[key] - value) <= 1e-6, key
    assert [p["forget_gap"] for p in light.curve] == [p["forget_gap"] for p in full.curve]
    assert [p["step"] for p in light.curve if "retain_nll" in p] == [0, 2, 4, 6]
    assert light.eval_tokens < full.eval_tokens
    assert light.config["eval_utility_every"] == 2 and light.config["eval_utility_blocks"] == 4
