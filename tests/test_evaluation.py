"""The metrics mean what the brief says."""

from __future__ import annotations

import torch

from tuner.evaluation import auc, full_metrics, mia_scores, token_nll


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
