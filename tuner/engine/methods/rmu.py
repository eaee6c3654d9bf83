"""RMU, representation misdirection for unlearning (Li et al. 2024, WMDP): scramble the forget data's
activations at one decoder layer instead of touching its next-token probabilities.

    loss = mean ‖h_θ(forget) - c·u‖² + α · mean ‖h_θ(retain) - h_ref(retain)‖²

where h is the output of decoder layer `layer`, u a fixed random unit vector (uniform [0, 1) entries,
normalised, as in centerforaisafety/wmdp rmu/unlearn.py; drawn once per run from the run's seed) and both
means are over tokens and hidden units (blocks carry no padding). The retain term is RMU's own α, not the
shared λ: α is on a scale of its own (activation MSE, ~10³) and is declared here, so λ is not also searched.

The WMDP code updates only the MLPs of layers 5-7; here the whole model trains, as open-unlearning's RMU
config does (`trainable_params_regex: .*`). The activations are read by a forward hook on the layer, and the
forward pass stops there (the rest of the model, head included, never runs).

Under data parallelism the stop must not cut short the wrapper's own forward: DDP averages gradients only
after a forward that returned. So the policy runs through `LayerProbe`, a module whose forward returns the
layer's activations, and DDP wraps that probe (told that later layers and the head get no gradient); forget and
retain blocks go through it in one forward, since DDP expects one forward per backward. FSDP2 shards the model
itself: a stopped forward of its root is completed by the backward (FSDP2's post-backward callback ends the
iteration), and a stopped forward without gradients (the frozen reference's) is ended with FSDP2's
`reset_iter_state`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.core.errors import TunerError
from tuner.core.hparams import Hyperparameter
from tuner.core.lossout import LossOut
from tuner.engine.methods import register
from tuner.engine.methods.base import Batch, MethodContext, UnlearningMethod

if TYPE_CHECKING:
    import torch

LAYER = Hyperparameter(
    "layer", "RMU layer", default=7, low=0, high=7, integer=True, at_least=0, depth=32,
    source="centerforaisafety/wmdp rmu/unlearn.py (layer_id 7 of zephyr-7b's 32, about 22% of the depth); "
           "open-unlearning configs/trainer/RMU.yaml (model.layers.7)",
    help="the decoder layer (0-based) whose output activations RMU steers; by default the layer at 7/32 of the "
         "model's depth (searched from 0 to there); a value given is a layer index and must exist in the model")
STEERING = Hyperparameter(
    "steering_coeff", "RMU steering coefficient c", default=6.5, low=1.0, high=100.0, log=True, symbol="c",
    source="WMDP paper / centerforaisafety/wmdp README run for zephyr-7b (--steering_coeffs 6.5,6.5)",
    help="c, the norm of the random target c·u for forget activations (scale it with the model's activations)")
ALPHA = Hyperparameter(
    "alpha", "RMU retain weight α", default=1200.0, low=10.0, high=1e4, log=True, symbol="α",
    source="WMDP paper / centerforaisafety/wmdp README run for zephyr-7b (--alpha 1200,1200)",
    help="α, the weight of the retain activations' MSE to the frozen model's")


def steering_vector(hidden: int, seed: int) -> torch.Tensor:
    """u: uniform [0, 1) entries normalised to unit length, from the run's seed (CPU generator, so the same
    seed gives the same u on any device)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)
    u = torch.rand(hidden, generator=gen)
    return u / u.norm()


@register
class RMU(UnlearningMethod):
    name = "rmu"
    summary = "steer forget activations at one layer to a random vector; hold retain activations to the original"
    uses_retain = True  # the retain term is weighted by RMU's own α, not λ
    needs_reference = True  # the frozen model's retain activations

    partial_forward = True  # the probe's forward stops at the layer: later layers and the head are unused
    own = (LAYER, STEERING, ALPHA)

    def prepare(self, ctx: MethodContext) -> None:
        from tuner.engine.probe import decoder_layers

        super().prepare(ctx)  # resolves the default layer against the model's depth
        layers = decoder_layers(ctx.model)
        if layers is None:
            raise TunerError("rmu: cannot find the model's decoder layers (expected a 'layers' or 'h' list)")
        index = int(self.value(LAYER))
        if not 0 <= index < len(layers):
            raise TunerError(f"rmu: layer {index} does not exist: the model has {len(layers)} decoder layers "
                             f"(choose layer 0..{len(layers) - 1})")
        self.index = index
        self.layer = layers[index]
        # With LoRA the reference is the same model with its adapters off: the same layer module.
        ref_layers = decoder_layers(ctx.reference)
        self.ref_layer = ref_layers[index] if ref_layers is not None else self.layer
        self.u = steering_vector(ctx.model.config.get_text_config().hidden_size, ctx.seed).to(ctx.device)

    def training_module(self, model: torch.nn.Module) -> torch.nn.Module:
        from tuner.engine.probe import LayerProbe

        return LayerProbe(model)

    def loss(self, model, batch: Batch) -> LossOut:
        import torch
        import torch.nn.functional as F

        from tuner.engine.probe import LayerProbe, layer_output, unwrapped

        probe = model if isinstance(unwrapped(model), LayerProbe) else LayerProbe(model)
        # forget and retain in one forward: DDP expects one forward per backward
        hidden = probe(torch.cat([batch.forget, batch.retain]), layer=self.index).float()
        forget_h, retain_h = hidden[:batch.forget.shape[0]], hidden[batch.forget.shape[0]:]
        target = (self.value(STEERING) * self.u).expand_as(forget_h)
        forget = F.mse_loss(forget_h, target)
        with torch.no_grad():
            ref_h = layer_output(self.ctx.reference, self.ref_layer, batch.retain).float()
        retain = F.mse_loss(retain_h, ref_h)
        loss = forget + self.value(ALPHA) * retain
        return LossOut(loss, {"forget_mse": forget, "retain_mse": retain})
