"""Reading one decoder layer's activations without running the rest of the model, in a way data parallelism
supports (RMU steers them): the forward pass stops right after the layer, and `LayerProbe` is the module whose
forward returns those activations normally, so DDP's post-forward step (which prepares the gradient all-reduce)
runs."""

from __future__ import annotations

import torch

from tuner.core.errors import TunerError


class _Reached(Exception):
    """Raised by the hook once the layer has run: the rest of the forward pass is not needed."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder's list of layers (`model.layers` in Llama-style models, `transformer.h` in GPT-2), also
    inside a peft or DDP wrapper; None when the module exposes none (the LoRA reference wrapper)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return module
    return None


def layer_output(model: torch.nn.Module, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The output hidden states `[B, T, H]` of `layer` when `model` runs on `ids`; the forward pass stops
    right after it. The hook is removed before returning, so a recomputation of the layer in the backward
    pass (gradient checkpointing) runs it plain."""
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Reached:
        if not torch.is_grad_enabled():
            _end_stopped_forward(model)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("RMU's layer did not run in the model's forward pass")
    return captured[0]


def _end_stopped_forward(model: torch.nn.Module) -> None:
    """After a stopped forward without gradients of an FSDP2 root (the sharded frozen reference), end FSDP2's
    iteration as its documented recovery does: no backward will, and the next forward must start as a root
    forward. A stopped forward with gradients is ended by its backward instead."""
    reset = getattr(model, "reset_iter_state", None)
    if reset is not None:
        reset()


class LayerProbe(torch.nn.Module):
    """The model run up to one decoder layer: `probe(ids, layer)` returns the output hidden states `[B, T, H]`
    of decoder layer `layer` (an index) and runs nothing after it.

    It is what data parallelism wraps for RMU (`RMU.training_module`): its forward returns normally, so DDP's
    post-forward step runs and the gradients are averaged over ranks."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        layers = decoder_layers(model)
        if layers is None:
            raise TunerError("rmu: cannot find the model's decoder layers (expected a 'layers' or 'h' list)")
        self._layers = list(layers)  # a plain list: the layers are registered once, under `model`

    def forward(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        return layer_output(self.model, self._layers[layer], input_ids)




def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
