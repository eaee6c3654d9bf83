"""WGA: forget tokens are weighted by the model's probability of them to the power β, and it unlearns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuner.engine import methods
from tuner.engine.methods.base import Batch, MethodContext, token_nll_term
from tuner.engine.methods.wga import token_weights
from tuner.engine.unlearn import UnlearnConfig

FIXED = {"stop_at_target": False, "checkpoint": "last", "device": "cpu"}


def test_wga_declares_beta_and_its_retain_weight():
    cls = methods.get("wga")
    assert cls.hyperparameters() == ["lr", "epochs", "retain_weight", "beta"]
    assert cls.has_retain_term and cls.uses_retain and not cls.needs_reference
    assert not cls.reference_distributions and cls.full_logit_streams == 0
    assert UnlearnConfig(method="wga", beta=5).params["beta"] == 5
    with pytest.raises(ValueError, match="method 'wga'.*beta"):
        UnlearnConfig(method="wga", beta=0)


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_wga_weights_are_token_probabilities_to_the_power_beta(bench, data, beta):
    model = bench.fresh().eval()
    ids = data.forget[:4]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    token_nll = token_nll_term(model, ids)
    weights = token_weights(token_nll, beta)
    assert torch.allclose(weights, probs ** beta, rtol=1e-4, atol=1e-12)
    assert not weights.requires_grad and token_nll.requires_grad  # weights scale the gradient, untrained

    # the method's loss is -mean(w · NLL) + λ · retain NLL, and its gradient is the weighted ascent's
    method = methods.get("wga")()
    method.prepare(MethodContext(model=model, reference=None, forget=data.forget, device=torch.device("cpu"),
                                 dtype=torch.float32, seed=0,
                                 params=methods.get("wga").settings({"beta": beta, "retain_weight": 0.5}),
                                 eval_batch_size=32))
    retain = data.retain_for("in_distribution")[:4]
    out = method.loss(model, Batch(forget=ids, forget_rows=torch.arange(4), retain=retain))
    expected = -(probs ** beta * token_nll.detach()).mean()
    assert out.parts["forget_wga"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(expected.item() + 0.5 * out.parts["retain_nll"].item(), rel=1e-4)
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    weighted = -(probs ** beta * nll).mean()
    params = list(model.parameters())
    ours = torch.autograd.grad(out.parts["forget_wga"], params, allow_unused=True)
    theirs = torch.autograd.grad(weighted, params, allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6, rtol=1e-3))


def test_wga_raises_forget_nll(unlearn, baseline):
    # β small enough that the micro model's ~1% token probabilities still carry weight (p^β ≈ 0.6 at β = 0.1)
    result = unlearn(method="wga", lr=1e-3, max_steps=6, beta=0.1, **FIXED)
    assert result.status == "completed"
    assert result.metrics["forget_nll"] > baseline["forget_nll"] + 0.5
    assert result.curve[-1]["forget_nll"] > result.curve[0]["forget_nll"]
