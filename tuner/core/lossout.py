"""What a loss callable hands the training loop (`tuner.engine.training.run_loop`): the loss to minimise and its named
parts. Declared without importing torch, so a method's file imports it at no cost when the CLI only lists the
methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class LossOut:
    """A micro-batch's loss to minimise and its named parts (detached) for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
