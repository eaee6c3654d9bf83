"""WGA, weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient
Perspective and Go Beyond"): gradient ascent with each forget token weighted by the model's own current
probability of it, so tokens already unlikely stop being pushed and the ascent does not run away.

    forget = -mean over forget tokens of w_t · NLL_t,    w_t = p_θ(y_t)^β = exp(-NLL_t)^β, detached

plus λ · NLL on retained data, as in open-unlearning's WGA (GradDiff-based, NLL retain). The authors' code
(tmlr-group/G-effect dataloader.py) has `wga` without a retain term and `wga_kl` with a KL one; here the retain
term is part of the method and λ is searched. At β = 0 the forget term is plain gradient ascent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.hparams import RETAIN_WEIGHT, Hyperparameter
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, nll_term, token_nll_term

if TYPE_CHECKING:
    import torch

BETA = Hyperparameter(
    "beta", "WGA weight exponent β", default=1.0, low=0.1, high=10.0, log=True, symbol="β",
    source="open-unlearning configs/trainer/WGA.yaml (beta: 1.0, with the NLL retain term as here); "
           "the authors' tmlr-group/G-effect dataloader.py falls back to 5",
    help="β of WGA: token weights are p_θ(y_t)^β, so larger β stops pushing unlikely tokens sooner")


def token_weights(token_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """p_θ(y_t)^β from the per-token NLL, detached: the weights scale the gradient, they are not trained."""
    import torch

    return torch.exp(-beta * token_nll.detach())


@register
class WGA(UnlearningMethod):
    name = "wga"
    summary = "gradient ascent with tokens weighted by p_θ(y)^β on forget + λ · retain NLL"
    has_retain_term = True
    uses_retain = True
    own = (BETA,)

    def loss(self, model, batch: Batch) -> LossOut:
        token_nll = token_nll_term(model, batch.forget)
        forget = -(token_weights(token_nll, self.value(BETA)) * token_nll).mean()
        retain_nll = nll_term(model, batch.retain)
        loss = forget + self.value(RETAIN_WEIGHT) * retain_nll
        return LossOut(loss, {"forget_wga": forget, "forget_nll": token_nll.mean(), "retain_nll": retain_nll})
