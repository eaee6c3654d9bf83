"""The field's metrics (exact memorisation, extraction strength, MinK++, privleak, the reference attack) against
values worked out in the test from their definitions, and against open-unlearning's definitions written out
here as plain loops; then on the micro testbed, where the original model remembers its forget set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tuner.core.metrics import BY_NAME, OBJECTIVES, TABLE
from tuner.engine.evaluation import (
    auc,
    exact_memorisation,
    extraction_strength,
    full_metrics,
    mia_scores,
    original_metrics,
    privleak,
    token_stats,
)
from tuner.engine.lossfn import logit_stats

CPU = torch.device("cpu")


def test_logit_stats_match_the_definitions_token_by_token():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]])
    targets = torch.tensor([0, 2, 0])
    stats = logit_stats(logits, targets)
    for index, (row, target) in enumerate(zip(logits.tolist(), targets.tolist(), strict=True)):
        norm = math.log(sum(math.exp(v) for v in row))
        logp = [v - norm for v in row]
        p = [math.exp(v) for v in logp]
        mu = sum(pi * li for pi, li in zip(p, logp, strict=True))
        var = sum(pi * li * li for pi, li in zip(p, logp, strict=True)) - mu * mu
        expected = [-logp[target], float(max(range(3), key=lambda j: row[j]) == target),
                    (logp[target] - mu) / math.sqrt(max(var, 1e-6))]
        assert stats[index].tolist() == pytest.approx(expected, abs=1e-5)


def test_exact_memorisation_and_extraction_strength_by_hand():
    hits = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert exact_memorisation(hits).tolist() == [0.75, 0.0, 1.0, 0.75]
    # ES: 1 - k/T for the smallest k after which every prediction is right (k = 2, none, 0, none)
    assert extraction_strength(hits).tolist() == [0.5, 0.0, 1.0, 0.0]


def _open_unlearning_es(preds: list[int], labels: list[int]) -> float:
    """open-unlearning's extraction_strength loop, written out."""
    n = len(labels)
    for k in range(n):
        if preds[k:] == labels[k:]:
            break
    return 1 - k / n


def _open_unlearning_minkpp(target_lp: list[float], vocab_lp: list[list[float]], k: float) -> float:
    """open-unlearning's MinK++ score (higher: less likely a member), written out."""
    scores = []
    for lp_t, row in zip(target_lp, vocab_lp, strict=True):
        mu = sum(math.exp(v) * v for v in row)
        sigma = max(sum(math.exp(v) * v * v for v in row) - mu * mu, 1e-6)
        scores.append((lp_t - mu) / math.sqrt(sigma))
    count = max(1, int(len(scores) * k))
    return -sum(sorted(scores)[:count]) / count


def test_em_es_and_minkpp_agree_with_open_unlearnings_definitions():
    torch.manual_seed(0)
    logits = torch.randn(6, 5) * 3
    labels = logits.argmax(-1).clone()
    labels[1] = (labels[1] + 1) % 5  # one wrong prediction early: the suffix from token 2 on is right
    stats = logit_stats(logits, labels)
    hits = stats[:, 1][None]
    preds = logits.argmax(-1).tolist()
    assert float(extraction_strength(hits)) == pytest.approx(_open_unlearning_es(preds, labels.tolist()))
    em = sum(p == t for p, t in zip(preds, labels.tolist(), strict=True)) / len(preds)
    assert float(exact_memorisation(hits)) == pytest.approx(em)
    vocab_lp = logits.log_softmax(-1)
    target_lp = vocab_lp.gather(-1, labels[:, None]).squeeze(-1)
    theirs = _open_unlearning_minkpp(target_lp.tolist(), vocab_lp.tolist(), 0.4)
    ours = mia_scores(stats[:, 0][None], None, 0.4, z=stats[:, 2][None])["minkpp"]
    assert float(ours) == pytest.approx(-theirs, abs=1e-5)  # ours ranks members high, theirs low


def test_mink_takes_the_floor_of_k_tokens_as_open_unlearning_does():
    nll = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0, 6.0]])  # 6 tokens, k 0.4: the 2 least likely
    assert float(mia_scores(nll, None, 0.4)["mink"]) == pytest.approx(-(5.0 + 6.0) / 2)
    assert float(mia_scores(nll, None, 0.1)["mink"]) == pytest.approx(-6.0)  # at least one token


def test_privleak_by_hand_in_muses_orientation():
    assert privleak(0.5, 0.5) == pytest.approx(0.0)
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)  # the forget set fully recognised: MUSE's original
    assert privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearned
    assert privleak(0.7, 0.6) == pytest.approx((0.3 - 0.4) / 0.4 * 100)
    assert privleak(0.9, 1.0) is None  # a reference MUSE would divide by 0


def test_reference_attack_scores_the_change_from_the_original():
    original = torch.tensor([2.0, 2.0])
    nll = torch.tensor([[3.0, 3.0], [2.0, 2.0]])  # block 0 became less likely, block 1 did not change
    assert mia_scores(nll, None, original=original)["ref"].tolist() == [-1.0, 0.0]
    assert auc(torch.tensor([-1.0, -0.5]), torch.tensor([0.0, 0.1])) == 0.0


def test_catalogue_names_every_table_row_and_objective():
    assert set(TABLE) <= set(BY_NAME) and set(OBJECTIVES) <= set(BY_NAME)
    assert BY_NAME["privleak"].objective(-7.0) == 7.0 and BY_NAME["mia_auc"].objective(0.3) == pytest.approx(0.2)
    assert BY_NAME["privleak"].side(-20.0) == "remembered" and BY_NAME["mia_auc"].side(0.9) == "remembered"
    assert BY_NAME["forget_gap"].side(-0.3) == "remembered" and BY_NAME["forget_gap"].side(0.3) == "over_unlearned"


def test_token_stats_nll_is_token_nll_and_hits_are_the_argmax(bench, data):
    blocks = data.forget[:4]
    stats = token_stats(bench.reference, blocks, 3, CPU)
    with torch.no_grad():
        logits = bench.reference(input_ids=blocks).logits[:, :-1]
    expected = F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:], reduction="none")
    assert stats.shape == (4, blocks.shape[1] - 1, 3)
    assert torch.allclose(stats[..., 0], expected, atol=1e-5)
    assert torch.equal(stats[..., 1].bool(), logits.argmax(-1) == blocks[:, 1:])


def test_the_original_testbed_model_memorises_its_forget_set(bench, data):
    metrics, original = original_metrics(bench.reference, data, 16, CPU, torch.float32)
    assert metrics["forget_em"] > metrics["unseen_em"] and metrics["forget_es"] >= metrics["unseen_es"]
    assert metrics["mia_auc_minkpp"] > 0.5 and metrics["privleak"] < 0  # it still leaks: negative, like MUSE's
    assert "mia_auc_ref" not in metrics  # no yardstick for the original itself: not measured, not 0.5
    assert metrics["mink_k"] == 0.4 and metrics["privleak_reference_auc"] == 0.5
    assert set(original) == {"forget", "unseen"} and original["forget"].shape == (data.eval_sets()["forget"].shape[0],)
    itself = full_metrics(bench.reference, data, 16, CPU, torch.float32, metrics, original=original,
                          leak_reference=metrics["mia_auc_mink"])
    assert itself["privleak"] == pytest.approx(0.0, abs=1e-9) and itself["utility_drop"] == pytest.approx(0.0)
    assert itself["mia_auc_ref"] == 0.5  # against itself every block scores 0
    assert full_metrics(bench.reference, data, 16, CPU, torch.float32, mink_k=0.2)["mink_k"] == 0.2


# ---- VerbMem -----------------------------------------------------------------------------------------------------

def test_rouge_l_is_the_longest_common_subsequence_f1():
    from tuner.engine.verbmem import rouge_l_scorer

    scorer, _ = rouge_l_scorer()
    score = scorer.score("the cat sat", "the cat sat down")["rougeL"]  # LCS 3: P 3/4, R 3/3
    assert score.fmeasure == pytest.approx(2 * 0.75 * 1.0 / 1.75)


def test_verbmem_is_one_for_text_the_model_continues_itself_and_less_for_other_text(bench, data):
    """Blocks made of a prompt and the model's own greedy continuation are recited verbatim (1.0); the same
    prompts followed by the true text are not. The tokens travel through the real tokenizer and scorer; a
    continuation without words (the micro model often emits spaces) is left out, not scored 0."""
    from tuner.engine.verbmem import VerbMemPlan, verbatim_memorisation

    model, tokenizer = bench.reference, bench.tokenizer
    true = data.forget[:6, :24]
    with torch.no_grad():
        own = model.generate(input_ids=true[:, :8], attention_mask=torch.ones_like(true[:, :8]), do_sample=False,
                             max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    plan = VerbMemPlan(blocks=6, prefix=8, tokens=16, seed=0, decode=tokenizer.decode)
    assert verbatim_memorisation(model, own, plan, 4, CPU) == pytest.approx(1.0)
    assert verbatim_memorisation(model, true, plan, 4, CPU) < 1.0
    assert verbatim_memorisation(model, true, plan, 4, CPU) == verbatim_memorisation(model, true, plan, 2, CPU)


def test_verbmem_reaches_the_metrics_only_when_asked(bench, data):
    from tuner.engine.verbmem import VerbMemPlan

    plan = VerbMemPlan(blocks=3, prefix=16, tokens=8, seed=0, decode=bench.tokenizer.decode)
    with_verbmem = full_metrics(bench.reference, data, 16, CPU, torch.float32, verbmem=plan)
    assert 0.0 <= with_verbmem["forget_verbmem"] <= 1.0 and 0.0 <= with_verbmem["unseen_verbmem"] <= 1.0
    assert "forget_verbmem" not in full_metrics(bench.reference, data, 16, CPU, torch.float32)


def test_a_study_of_several_workers_refuses_verbmem_in_one_line(micro_spec):
    from tuner.study.spec import StudySpec

    with pytest.raises(ValueError, match="run.verbmem_blocks: verbatim memorisation generates in one process"):
        StudySpec.model_validate(micro_spec(run={"verbmem_blocks": 4}, resources={"workers": 2}))
