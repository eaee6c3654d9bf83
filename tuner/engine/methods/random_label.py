"""Random labels: cross-entropy toward tokens drawn uniformly from the vocabulary."""

from __future__ import annotations

from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, MethodContext, UnlearningMethod, target_ce_term


@register
class RandomLabel(UnlearningMethod):
    name = "random_label"
    summary = "cross-entropy toward uniformly random labels on the forget set"

    def prepare(self, ctx: MethodContext) -> None:
        import torch

        super().prepare(ctx)
        # Drawn once per run from the seed, so a trial is reproducible and every epoch sees the same labels.
        gen = torch.Generator().manual_seed(ctx.seed + 104729)
        vocab = ctx.model.get_output_embeddings().weight.shape[0]
        n, t = ctx.forget.shape
        self.labels = torch.randint(0, vocab, (n, t - 1), generator=gen)

    def loss(self, model, batch: Batch) -> LossOut:
        targets = self.labels[batch.forget_rows.cpu()].to(batch.forget.device)
        ce = target_ce_term(model, batch.forget, targets)
        return LossOut(ce, {"forget_ce": ce})
