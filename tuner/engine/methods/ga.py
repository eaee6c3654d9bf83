"""Gradient ascent: maximise the NLL of the forget set (Q = δ(w_t), gradient negated)."""

from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, nll_term


@register
class GradientAscent(UnlearningMethod):
    name = "ga"
    summary = "gradient ascent on the forget set (no retain term)"

    def loss(self, model, batch: Batch) -> LossOut:
        forget_nll = nll_term(model, batch.forget)
        return LossOut(-forget_nll, {"forget_nll": forget_nll})
