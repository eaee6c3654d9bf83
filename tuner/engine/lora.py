"""LoRA through peft: the memory saver that lets one GPU unlearn a model whose full fine-tuning does not fit.

With LoRA the frozen reference (GA+KL, adversarial labels) is the base model with its adapters switched off,
not a second copy of the weights.
"""

from __future__ import annotations

import torch

from tuner.core.errors import TunerError
from tuner.core.settings import LoraSpec


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt: nn.Linear, or the Conv1D that GPT-2-style models use."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)  # Conv1D stores its weight as (in, out)
    return None


def adapted_layers(model: torch.nn.Module, spec: LoraSpec) -> list[tuple[str, int, int]]:
    """(name, in, out) of the layers `spec` adapts, found the way peft finds them: by the last part of their
    name, or every linear layer but the output embedding for all-linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        features = _features(module)
        if features is None or module is head:
            continue
        if spec.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in spec.target_modules:
            found.append((name, *features))
    return found


def adapter_parameters(model: torch.nn.Module, spec: LoraSpec) -> int:
    """Trainable parameters LoRA adds: r · (in + out) per adapted layer."""
    return sum(spec.r * (n_in + n_out) for _, n_in, n_out in adapted_layers(model, spec))


def attach(model: torch.nn.Module, spec: LoraSpec, adapter_dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Wrap `model` (in place) with fresh adapters in `adapter_dtype`; the base weights are frozen."""
    try:
        import peft
    except ImportError as err:
        raise TunerError(f"run.lora needs peft ({err}); pip install 'peft>=0.12'") from None
    if not adapted_layers(model, spec):
        raise TunerError(f"run.lora.target_modules: no linear layer of this model is named {spec.target_modules}")
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=spec.target_modules, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapters' initialisation is part of the run, so it follows the seed
        wrapped = peft.get_peft_model(model, config)
    for p in wrapped.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    return wrapped


class AdaptersOff(torch.nn.Module):
    """The frozen reference of a LoRA run: the same module called with its adapters disabled, in eval mode
    (no dropout, whatever mode the adapted model trains in; its modes are restored after each call).

    It holds the adapted model outside its own parameters, so nothing is counted or moved twice."""

    def __init__(self, adapted: torch.nn.Module) -> None:
        super().__init__()
        self._adapted = [adapted]

    @property
    def config(self):
        return self._adapted[0].config

    def forward(self, *args, **kwargs):
        adapted = self._adapted[0]
        modes = [(m, m.training) for m in adapted.modules()]
        adapted.eval()
        try:
            with adapted.disable_adapter():
                return adapted(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training
