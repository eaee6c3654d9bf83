"""NPO: its forget term starts at (2/β)·log 2 per sequence and unlearns on the micro testbed."""

from __future__ import annotations

import math

import pytest
import torch

from tuner.engine import methods
from tuner.engine.methods.base import Batch, MethodContext
from tuner.engine.unlearn import UnlearnConfig

FIXED = {"stop_at_target": False, "checkpoint": "last", "device": "cpu"}


def prepared(bench, data, model, **params):
    method = methods.get("npo")()
    settings = methods.get("npo").settings(params)
    method.prepare(MethodContext(model=model, reference=bench.reference, forget=data.forget,
                                 device=torch.device("cpu"), dtype=torch.float32, seed=0, params=settings,
                                 eval_batch_size=32))
    return method


def test_npo_declares_beta_and_its_retain_weight():
    cls = methods.get("npo")
    assert cls.hyperparameters() == ["lr", "epochs", "retain_weight", "beta"]
    # log p_ref(y) is read from the policy before its first step (it is the original): no frozen copy is held
    assert not cls.needs_reference and cls.uses_retain and cls.has_retain_term
    assert not cls.reference_distributions and cls.full_logit_streams == 0
    assert UnlearnConfig(method="npo", beta=0.2).params["beta"] == 0.2
    with pytest.raises(ValueError, match="method 'npo'.*beta"):
        UnlearnConfig(method="npo", beta=-1.0)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_forget_term_is_2_log_2_over_beta_before_any_update(bench, data, beta):
    model = bench.fresh().eval()  # the model is the reference: log p_θ(y) = log p_ref(y) for every sequence
    method = prepared(bench, data, model, beta=beta)
    rows = torch.arange(4)
    out = method.loss(model, Batch(forget=data.forget[rows], forget_rows=rows,
                                   retain=data.retain_for("in_distribution")[:4]))
    assert out.parts["forget_npo"].item() == pytest.approx(2 / beta * math.log(2), rel=1e-4)
    # the loss adds λ · retain NLL to it
    assert out.loss.item() == pytest.approx(out.parts["forget_npo"].item() + out.parts["retain_nll"].item(), rel=1e-5)


def test_npo_reference_log_likelihood_is_summed_over_each_sequence(bench, data):
    method = prepared(bench, data, bench.fresh())
    with torch.no_grad():
        logits = bench.reference(input_ids=data.forget[:3]).logits[:, :-1].float()
        expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), data.forget[:3, 1:],
                                                     reduction="none").sum(-1)
    assert method.ref_nll.shape == (data.forget.shape[0],)
    assert torch.allclose(method.ref_nll[:3], expected, rtol=1e-4)


def test_npo_raises_forget_nll(unlearn, baseline):
    result = unlearn(method="npo", lr=1e-3, max_steps=6, beta=0.1, **FIXED)
    assert result.status == "completed"
    assert result.metrics["forget_nll"] > baseline["forget_nll"] + 0.5
    assert result.curve[-1]["forget_nll"] > result.curve[0]["forget_nll"]
