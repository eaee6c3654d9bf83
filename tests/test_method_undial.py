"""UNDIAL: its target is the original's distribution with less mass on the true token, and it unlearns."""

from __future__ import annotations

import pytest
import torch

from tuner.engine import methods
from tuner.engine.methods.base import MethodContext
from tuner.engine.unlearn import UnlearnConfig

FIXED = {"stop_at_target": False, "checkpoint": "last", "device": "cpu"}


def test_undial_declares_beta():
    cls = methods.get("undial")
    assert cls.hyperparameters() == ["lr", "epochs", "beta"]
    assert cls.needs_reference and cls.reference_distributions and cls.full_logit_streams == 1
    assert not cls.uses_retain and not cls.has_retain_term
    assert UnlearnConfig(method="undial", beta=10).params["beta"] == 10
    with pytest.raises(ValueError, match="method 'undial'.*beta"):
        UnlearnConfig(method="undial", beta=0)


@pytest.mark.parametrize("beta", [3.0, 10.0])
def test_undial_target_takes_mass_from_the_true_token_only(bench, data, beta):
    method = methods.get("undial")()
    method.prepare(MethodContext(model=bench.fresh(), reference=bench.reference, forget=data.forget,
                                 device=torch.device("cpu"), dtype=torch.float32, seed=0,
                                 params=methods.get("undial").settings({"beta": beta}), eval_batch_size=32))
    ids = data.forget[:4]
    target = method.targets(ids)
    with torch.no_grad():
        original = torch.softmax(bench.reference(input_ids=ids).logits[:, :-1].float(), -1)
    truth = ids[:, 1:, None]
    assert torch.allclose(target.sum(-1), torch.ones(target.shape[:-1]), atol=1e-5)
    assert (target.gather(-1, truth) < original.gather(-1, truth)).all()  # less mass on every true token
    # exactly: the true token's odds against the rest shrink by e^β, the others keep their ratios
    p, q = original.gather(-1, truth), target.gather(-1, truth)
    assert torch.allclose(q / (1 - q), p / (1 - p) * torch.exp(torch.tensor(-beta)), rtol=1e-3)
    others = torch.ones_like(target, dtype=torch.bool).scatter(-1, truth, False)
    ratio = (target / original)[others].view(*target.shape[:-1], -1)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-3)


def test_undial_raises_forget_nll(unlearn, baseline):
    # UNDIAL's push on a token is bounded by the probability the model gives it (the gradient on its logit is
    # p_θ - target): the micro model gives its forget tokens ~1% (NLL ~4.7), so the rise is small but real,
    # and larger on the forget set than on retained data.
    result = unlearn(method="undial", lr=3e-3, max_steps=6, beta=30.0, **FIXED)
    assert result.status == "completed"
    forget_rise = result.metrics["forget_nll"] - baseline["forget_nll"]
    assert forget_rise > 0.04
    assert forget_rise > result.metrics["retain_nll"] - baseline["retain_nll"]
