"""GA + KL: gradient ascent on the forget set plus λ · KL(P_original || P_model) on retained data."""

from tuner.core.hparams import RETAIN_WEIGHT
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, kl_term, nll_term


@register
class GradientAscentKL(UnlearningMethod):
    name = "ga_kl"
    summary = "gradient ascent on forget + λ · KL to the original model on retain"
    has_retain_term = True
    uses_retain = True
    needs_reference = True
    reference_distributions = True
    full_logit_streams = 1  # the KL term on retain batches

    def loss(self, model, batch: Batch) -> LossOut:
        forget_nll = nll_term(model, batch.forget)
        kl = kl_term(model, self.ctx.reference, batch.retain)
        return LossOut(-forget_nll + self.value(RETAIN_WEIGHT) * kl, {"forget_nll": forget_nll, "retain_kl": kl})
