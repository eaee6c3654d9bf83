"""GA + GD: gradient ascent on the forget set plus λ · NLL on retained data (1 : 1 by default)."""

from tuner.core.hparams import RETAIN_WEIGHT
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, nll_term


@register
class GradientAscentDescent(UnlearningMethod):
    name = "ga_gd"
    summary = "gradient ascent on forget + λ · gradient descent on retain"
    has_retain_term = True
    uses_retain = True

    def loss(self, model, batch: Batch) -> LossOut:
        forget_nll = nll_term(model, batch.forget)
        retain_nll = nll_term(model, batch.retain)
        loss = -forget_nll + self.value(RETAIN_WEIGHT) * retain_nll
        return LossOut(loss, {"forget_nll": forget_nll, "retain_nll": retain_nll})
