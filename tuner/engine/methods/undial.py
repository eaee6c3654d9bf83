"""UNDIAL, unlearning via self-distillation with adjusted logits (Dong et al. 2024): distil the original model
into itself on the forget data, with each true next token's logit lowered by β in the teacher.

    target_t = softmax(z_ref,t - β · onehot(y_t)),    loss = mean over tokens of CE(target_t, p_θ,t)

Only the memorised token loses mass, and by a bounded amount, so the loss stays finite where gradient
ascent's diverges. The authors' code (dong-river/LLM_unlearning utils/ft_utils.py, DITrainer) has no retain
term, and open-unlearning's UNDIAL config sets its retain weight to 0: so none here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.hparams import Hyperparameter
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, no_grad, target_ce_term

if TYPE_CHECKING:
    import torch

BETA = Hyperparameter(
    "beta", "UNDIAL logit reduction β", default=3.0, low=0.5, high=30.0, log=True, symbol="β",
    source="dong-river/LLM_unlearning README runs (--di_strength 3; its main.py default is 5, its sweeps "
           "3/10/30; open-unlearning configs/trainer/UNDIAL.yaml uses 10)",
    help="β of UNDIAL: how far the true token's logit is lowered in the distillation target")


@no_grad
def adjusted_targets(reference: torch.nn.Module, ids: torch.Tensor, beta: float) -> torch.Tensor:
    """softmax(z_ref - β · onehot(true next token)) `[B, T-1, V]` in fp32: the original model's next-token
    distribution with the true token's logit lowered by β."""
    import torch
    import torch.nn.functional as F

    from tuner.engine.lossfn import next_token_logits

    logits = next_token_logits(reference, ids).float()
    logits.scatter_add_(-1, ids[:, 1:, None], torch.full_like(logits[..., :1], -beta))
    return F.softmax(logits, dim=-1)


@register
class UNDIAL(UnlearningMethod):
    name = "undial"
    summary = "self-distillation toward the original's distribution with the true token's logit lowered by β"
    needs_reference = True
    reference_distributions = True  # the teacher's full next-token distributions
    full_logit_streams = 1  # cross-entropy toward full target distributions on forget batches
    own = (BETA,)

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        return adjusted_targets(self.ctx.reference, ids, self.value(BETA))

    def loss(self, model, batch: Batch) -> LossOut:
        ce = target_ce_term(model, batch.forget, self.targets(batch.forget))
        return LossOut(ce, {"forget_ce": ce})
