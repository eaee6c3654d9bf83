"""Adversarial samples: cross-entropy toward a_t = argmax_{a != w_t} P_original(a | w_<t), computed once
from the original model before training (as in the paper's released code)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, MethodContext, UnlearningMethod, precompute_labels, target_ce_term

if TYPE_CHECKING:
    import torch


def top1_excluding_truth(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The most likely next token other than the true one."""
    masked = logits.scatter(-1, ids[:, 1:, None], float("-inf"))
    return masked.argmax(dim=-1)


@register
class Adversarial(UnlearningMethod):
    name = "adversarial"
    summary = "cross-entropy toward the original model's best wrong next token"

    def prepare(self, ctx: MethodContext) -> None:
        super().prepare(ctx)
        # the original model's labels, read from the policy before its first step (it is the original)
        self.labels = precompute_labels(ctx.model, ctx.forget, ctx.eval_batch_size, ctx.device,
                                        top1_excluding_truth)

    def loss(self, model, batch: Batch) -> LossOut:
        targets = self.labels[batch.forget_rows.cpu()].to(batch.forget.device)
        ce = target_ce_term(model, batch.forget, targets)
        return LossOut(ce, {"forget_ce": ce})
