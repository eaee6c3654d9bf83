"""The one training loop every method (and the testbed's pre-training) runs on.

Written like nanoGPT's: AdamW, a warmup + decay (or constant, or warmup-stable-decay) schedule, gradient
accumulation, clipping, optional bf16 autocast, and nothing else in the way. The loss is a callable, so methods
only say what to minimise. A non-finite loss is an outcome (`diverged_at`), never an exception.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tuner.core.errors import TunerError
from tuner.core.hparams import LR
from tuner.core.lossout import LossOut
from tuner.core.settings import OptimConfig, Schedule
from tuner.engine.evaluation import autocast_for

if TYPE_CHECKING:
    from tuner.engine.distributed import StepSync

@dataclass
class LoopOutcome:
    steps_done: int
    diverged_at: int | None = None
    reason: str | None = None
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


class IndexStream:
    """Row indices in seeded epochs: every row once per epoch, reshuffled each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen, self.buffer = n, torch.Generator().manual_seed(seed), torch.empty(0, dtype=torch.long)

    def take(self, k: int) -> torch.Tensor:
        if self.buffer.numel() < k:  # one cat, not one per epoch: batches far larger than the set stay cheap
            epochs = -(-(k - self.buffer.numel()) // self.n)
            self.buffer = torch.cat([self.buffer, *(torch.randperm(self.n, generator=self.gen) for _ in range(epochs))])
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out


def lr_multiplier(schedule: Schedule, warmup_steps: int, total_steps: int,
                  decay_ratio: float = 0.2) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimiser step `s` (0-based).

    Which steps depend on the horizon `total_steps`: under `constant` none (given a warmup in steps), so a
    trial's checkpoint at step S is what a run of S steps gives; under `wsd` the steps before its decay
    (the last `decay_ratio` of the horizon); under `linear` and `cosine` every step after the warmup."""

    decay_steps = max(1, math.ceil(decay_ratio * total_steps))

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        if schedule == "wsd":
            return min(1.0, (total_steps - s) / decay_steps)
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def schedule_of(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier of each step (0-based) of a run of `total_steps` steps under `cfg`."""
    return lr_multiplier(cfg.schedule, warmup_of(cfg, total_steps), total_steps, cfg.decay_ratio)


def warmup_of(cfg: OptimConfig, total_steps: int) -> int:
    """The warmup's length in steps: `warmup_steps` when given (fixed), else `warmup_ratio` of the horizon."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `params`. On bf16 weights a plain AdamW rounds updates below half an ulp away, so bf16
    weights always get torchao's AdamW with bf16 stochastic rounding (unbiased: E[w_new] = w + Δw)."""
    bf16_weights = any(p.dtype == torch.bfloat16 for p in params)
    if cfg.optimizer == "adamw" and not bf16_weights:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")
    optim = _torchao_optim()
    # `_AdamW` is torchao's documented entry point for full-precision states with bf16 stochastic rounding.
    cls = optim.AdamW8bit if cfg.optimizer == "adamw8bit" else optim._AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, bf16_stochastic_round=bf16_weights)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """What is recorded with a trial: the class that actually ran, e.g. `torch.optim.AdamW`."""
    cls = type(optimizer)
    return f"{cls.__module__.split('.')[0]}.optim.{cls.__name__}"


def torchao_module(name: str, needed_for: str):
    """`torchao.<name>`, imported quietly, or a TunerError saying what needs it."""
    import importlib
    import logging

    # torchao announces at import each GPU kernel library it cannot load; on CPU that is expected noise.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        return importlib.import_module(f"torchao.{name}")
    except ImportError as err:
        raise TunerError(f"{needed_for} need torchao ({err}); pip install 'torchao>=0.14'") from None


def _torchao_optim():
    return torchao_module("optim", "optimizer settings")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """torchao keeps the lr as a tensor (so its compiled step is not recompiled per value): fill it in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def run_loop(
    model: torch.nn.Module,
    micro_loss: Callable[[int, int], LossOut],
    total_steps: int,
    grad_accum: int,
    cfg: OptimConfig,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    after_step: Callable[[int, dict[str, float]], bool] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    sync: StepSync | None = None,
    lr_at: Callable[[int], float] | None = None,
) -> LoopOutcome:
    """Run `total_steps` optimiser steps; `micro_loss(step, micro)` builds each micro-batch's loss.

    `after_step(step_number, logs)` is called after every optimiser step (1-based) and may return True to
    stop (the approximate-retraining point was reached). `optimizer` defaults to `make_optimizer(cfg)`. `sync`
    is given when the run is sharded over ranks (`tuner.engine.distributed`): gradients are then all-reduced once per
    step and the logged loss is the global mean. `lr_at(step)` (0-based), when given, is the lr of each step in
    place of the schedule (the lr range test of `tuner.study.calibration`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or make_optimizer(params, cfg, device)
    factor = schedule_of(cfg, total_steps)
    outcome = LoopOutcome(steps_done=0)
    model.train()
    for step in range(total_steps):
        lr = lr_at(step) if lr_at is not None else cfg.lr * factor(step)
        set_lr(optimizer, lr)
        total = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}  # named loss parts, averaged over micro-batches
        for micro in range(grad_accum):
            with sync.micro_batch(micro == grad_accum - 1) if sync else contextlib.nullcontext():
                with autocast_for(device, dtype):
                    out = micro_loss(step, micro)
                (out.loss / grad_accum).backward()
            total += out.loss.detach().float() / grad_accum
            for name, value in out.parts.items():
                parts[name] = parts.get(name, 0.0) + value.detach().float() / grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        # one host sync per optimiser step, for the loss, the gradient norm and the logged loss parts
        names = list(parts)
        logged = torch.stack([total, *(parts[n] for n in names)])
        if sync is not None:
            logged = sync.mean(logged)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        loss_value, norm_value, *part_values = torch.cat(
            [logged[:1], grad_norm.to(total.device).float().reshape(1), logged[1:]]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            optimizer.zero_grad(set_to_none=True)
            outcome.diverged_at = step + 1
            what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", norm_value)
            outcome.reason = f"non-finite {what} ({value}) at step {step + 1}"
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        outcome.steps_done = step + 1
        logs = {"step": step + 1, "loss": loss_value, LR.name: lr, "grad_norm": norm_value}
        logs.update(zip(names, part_values, strict=True))
        outcome.history.append(logs)
        if after_step is not None and after_step(step + 1, logs):
            outcome.stopped_early = step + 1 < total_steps
            break
    return outcome
