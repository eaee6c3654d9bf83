"""Random-model labels: cross-entropy toward P_rand(· | w_<t) of a randomly initialised model of the same
architecture, created once per run with its own seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, MethodContext, UnlearningMethod, no_grad, target_ce_term

if TYPE_CHECKING:
    import torch


@register
class RandomModelLabel(UnlearningMethod):
    name = "random_model_label"
    summary = "cross-entropy toward the next-token distribution of a randomly initialised model"
    full_logit_streams = 1  # cross-entropy toward full target distributions

    def prepare(self, ctx: MethodContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        super().prepare(ctx)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(ctx.seed + 15485863)
            self.random_model = AutoModelForCausalLM.from_config(ctx.model.config)
        self.random_model.to(device=ctx.device, dtype=next(ctx.model.parameters()).dtype).eval()
        self.random_model.requires_grad_(False)

    @no_grad
    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        from tuner.engine.evaluation import next_token_logits

        return F.softmax(next_token_logits(self.random_model, ids).float(), dim=-1)

    def loss(self, model, batch: Batch) -> LossOut:
        ce = target_ce_term(model, batch.forget, self.targets(batch.forget))
        return LossOut(ce, {"forget_ce": ce})
