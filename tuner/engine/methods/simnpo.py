"""SimNPO (Fan et al. 2024, "Simplicity prevails"): NPO without the reference model, on the length-normalised
log-likelihood, so long and short forget sequences are pushed alike and no frozen copy is held.

    forget = mean over forget sequences of -(2/β) · log σ(β · (-(1/|y|) · log p_θ(y) - γ))
           = mean of -(2/β) · log σ(-(β/|y|) · log p_θ(y) - β·γ)

as in the authors' code (OPTML-Group/Unlearn-Simple TOFU/dataloader.py, `simnpo_grad_diff`): the margin γ is
subtracted from the mean NLL inside the β scaling. The paper's SimNPO adds λ · NLL on retained data (there
`npo_coeff` · forget + `grad_diff_coeff` · retain, 0.1375 : 1 on TOFU, i.e. λ ≈ 7.3 relative to a unit forget
term), so the retain term is part of the method and λ is searched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.hparams import RETAIN_WEIGHT, Hyperparameter
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, nll_term, token_nll_term

if TYPE_CHECKING:
    import torch

BETA = Hyperparameter(
    "beta", "SimNPO inverse temperature β", default=2.5, low=0.5, high=10.0, log=True, symbol="β",
    source="OPTML-Group/Unlearn-Simple TOFU/config/forget.yaml (beta: 2.5); "
           "open-unlearning configs/trainer/SimNPO.yaml uses 4.5",
    help="β of SimNPO, scaling the length-normalised NLL")
GAMMA = Hyperparameter(
    "gamma", "SimNPO reward margin γ", default=0.0, low=0.0, high=5.0, symbol="γ", at_least=0.0,
    source="OPTML-Group/Unlearn-Simple TOFU/config/forget.yaml (gamma: 0.0); "
           "open-unlearning configs/trainer/SimNPO.yaml (delta: 0.0)",
    help="γ of SimNPO, subtracted from the mean forget NLL: larger γ keeps pushing sequences already forgotten")


def simnpo_forget_term(mean_nll: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """-(2/β) · log σ(β · (mean NLL - γ)) per sequence, averaged; `mean_nll` is -(1/|y|) · log p_θ(y)."""
    import torch.nn.functional as F

    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - gamma)).mean()


@register
class SimNPO(UnlearningMethod):
    name = "simnpo"
    summary = "reference-free, length-normalised NPO on forget + λ · retain NLL"
    has_retain_term = True
    uses_retain = True
    needs_reference = False  # the point of SimNPO: no frozen copy of the model
    own = (BETA, GAMMA)

    def loss(self, model, batch: Batch) -> LossOut:
        mean_nll = token_nll_term(model, batch.forget).mean(-1)  # -(1/|y|) · log p_θ(y); blocks are unpadded
        forget = simnpo_forget_term(mean_nll, self.value(BETA), self.value(GAMMA))
        retain_nll = nll_term(model, batch.retain)
        loss = forget + self.value(RETAIN_WEIGHT) * retain_nll
        return LossOut(loss, {"forget_simnpo": forget, "forget_nll": mean_nll.mean(), "retain_nll": retain_nll})
