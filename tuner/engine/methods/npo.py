"""NPO, negative preference optimisation (Zhang et al. 2024): the forget sequences are the dispreferred side of
DPO with no preferred side, which bounds the forget term where gradient ascent's is not.

    forget = mean over forget sequences of -(2/β) · log σ(-β · (log p_θ(y) - log p_ref(y)))

with log p(y) summed over the sequence's tokens, plus λ · NLL on retained data: the NPO authors' TOFU default
(`forget_loss: npo_grad_diff`) and open-unlearning's NPO both carry that retain term, so it is part of the
method here and λ is searched. At β → 0 the forget term becomes gradient ascent on log p_θ(y)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.hparams import RETAIN_WEIGHT, Hyperparameter
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import (
    Batch,
    MethodContext,
    UnlearningMethod,
    evaluating,
    nll_term,
    no_grad,
    token_nll_term,
)

if TYPE_CHECKING:
    import torch

BETA = Hyperparameter(
    "beta", "NPO inverse temperature β", default=0.1, low=0.01, high=1.0, log=True, symbol="β",
    source="licong-lin/negative-preference-optimization TOFU/config/forget.yaml (beta: 0.1); "
           "open-unlearning configs/trainer/NPO.yaml (beta: 0.1)",
    help="β of NPO: small β approaches gradient ascent, large β saturates sooner")


@no_grad
def sequence_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """-log p(y) of each block (per-token NLL summed over the block, in eval mode), fp32 on CPU."""
    import torch

    from tuner.engine.lossfn import next_token_nll

    with evaluating(model):
        return torch.cat([next_token_nll(model, blocks[s:s + batch_size].to(device)).sum(-1).cpu()
                          for s in range(0, blocks.shape[0], batch_size)])


def npo_forget_term(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/β) · log σ(-β · (log p_θ - log p_ref)) per sequence, averaged; `nll` and `ref_nll` are -log p."""
    import torch.nn.functional as F

    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll)).mean()


@register
class NPO(UnlearningMethod):
    name = "npo"
    summary = "negative preference optimisation on forget (bounded GA, relative to the original) + λ · retain NLL"
    has_retain_term = True
    uses_retain = True
    own = (BETA,)

    def prepare(self, ctx: MethodContext) -> None:
        super().prepare(ctx)
        # The reference is the original model and the forget set fixed, so log p_ref(y) of every block is
        # computed once per run rather than by a second forward pass each step, from the policy before its
        # first step: it is the original, in the policy's dtypes, so the step-0 log-ratio is exactly 0 and no
        # frozen copy is needed.
        self.ref_nll = sequence_nll(ctx.model, ctx.forget, ctx.eval_batch_size, ctx.device)

    def loss(self, model, batch: Batch) -> LossOut:
        token_nll = token_nll_term(model, batch.forget)
        nll = token_nll.sum(-1)  # -log p_θ(y) per sequence
        ref_nll = self.ref_nll[batch.forget_rows.cpu()].to(nll.device)
        forget = npo_forget_term(nll, ref_nll, self.value(BETA))
        retain_nll = nll_term(model, batch.retain)
        loss = forget + self.value(RETAIN_WEIGHT) * retain_nll
        return LossOut(loss, {"forget_npo": forget, "forget_nll": token_nll.mean().detach(),
                              "retain_nll": retain_nll})
