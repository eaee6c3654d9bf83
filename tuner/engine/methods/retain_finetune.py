"""Fine-tune on retained data only: the retrain-like baseline (no forget term)."""

from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, UnlearningMethod, nll_term


@register
class RetainFinetune(UnlearningMethod):
    name = "retain_finetune"
    summary = "gradient descent on retained data only (retrain-like baseline)"
    uses_forget = False
    uses_retain = True

    def loss(self, model, batch: Batch) -> LossOut:
        retain_nll = nll_term(model, batch.retain)
        return LossOut(retain_nll, {"retain_nll": retain_nll})
