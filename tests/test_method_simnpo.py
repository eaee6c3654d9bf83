"""SimNPO: reference-free, on the length-normalised NLL, and it unlearns on the micro testbed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuner.core.precision import resolve_precision
from tuner.engine import methods
from tuner.engine.lossfn import next_token_nll
from tuner.engine.methods.base import Batch, MethodContext
from tuner.engine.unlearn import UnlearnConfig, run_unlearning

FIXED = {"stop_at_target": False, "checkpoint": "last", "device": "cpu"}


def test_simnpo_declares_beta_and_gamma_and_needs_no_reference():
    cls = methods.get("simnpo")
    assert cls.hyperparameters() == ["lr", "epochs", "retain_weight", "beta", "gamma"]
    assert not cls.needs_reference and not cls.reference_distributions and cls.full_logit_streams == 0
    assert cls.uses_retain and cls.has_retain_term
    cfg = UnlearnConfig(method="simnpo", beta=3.0, gamma=0.5)
    assert (cfg.params["beta"], cfg.params["gamma"]) == (3.0, 0.5)
    with pytest.raises(ValueError, match="method 'simnpo'.*gamma"):
        UnlearnConfig(method="simnpo", gamma=-0.1)
    with pytest.raises(ValueError, match="method 'simnpo'.*beta"):
        UnlearnConfig(method="simnpo", beta=0.0)


def test_simnpo_loss_is_the_length_normalised_npo_term_without_a_reference(bench, data):
    model = bench.fresh().eval()
    params = methods.get("simnpo").settings({"beta": 2.5, "gamma": 0.3})
    method = methods.get("simnpo")()
    method.prepare(MethodContext(model=model, reference=None, forget=data.forget, device=torch.device("cpu"),
                                 dtype=torch.float32, seed=0, params=params, eval_batch_size=32))
    rows = torch.arange(4)
    out = method.loss(model, Batch(forget=data.forget[rows], forget_rows=rows,
                                   retain=data.retain_for("in_distribution")[:4]))
    with torch.no_grad():
        mean_nll = next_token_nll(model, data.forget[rows]).mean(-1)
    expected = -(2 / 2.5) * F.logsigmoid(2.5 * (mean_nll - 0.3)).mean()
    assert out.parts["forget_simnpo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item() + out.parts["retain_nll"].item(), rel=1e-5)


def test_simnpo_runs_without_a_reference_and_raises_forget_nll(bench, data, baseline):
    # The micro model's forget NLL (~4.7 nats a token) already saturates σ at γ = 0, so the margin γ is set
    # above it: the forget term then still has gradient, as SimNPO's γ is meant to give.
    cfg = UnlearnConfig(method="simnpo", lr=1e-3, max_steps=6, beta=2.5, gamma=5.0, **FIXED)
    model, _ = bench.trainee(cfg, resolve_precision(cfg.precision, torch.device("cpu")))
    result = run_unlearning(model, data, cfg, reference=None, baseline=baseline)
    assert result.status == "completed"
    assert result.metrics["forget_nll"] > baseline["forget_nll"] + 0.5
    assert result.curve[-1]["forget_nll"] > result.curve[0]["forget_nll"]
