"""What an unlearning method is: a forget term and a retain term over one shared training loop.

A method sees one micro-batch (forget blocks, their row indices, retain blocks) and returns the loss to
minimise. Anything it needs from the original model (adversarial labels, a frozen reference for KL) is
prepared once per run in `prepare`, never per step.

Importing a method needs no torch: `tuner methods`, the spec's checks and the dashboards read a method's
catalogue (name, summary, flags, `own` hyperparameters) alone. So a method's file imports torch under
TYPE_CHECKING and inside the functions that compute, and decorates with `no_grad` rather than `torch.no_grad()`.

The original model's quantities match the policy's at step 0: `prepare` runs under the policy's autocast, and
what it precomputes from "the original" it reads from the policy itself before its first step (the same
weights, the same dtypes, so exactly the same numbers); the frozen reference, read per step, runs in eval mode
under the same autocast as the policy.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from tuner.core.fingerprint import fingerprint
from tuner.core.hparams import RETAIN_WEIGHT, SHARED, Hyperparameter, complete
from tuner.core.lossout import LossOut

if TYPE_CHECKING:
    import torch

_F = TypeVar("_F", bound=Callable)


@dataclass
class MethodContext:
    """What a run hands a method once, before the first step."""

    model: torch.nn.Module  # the policy, before its first step: the original model, as the policy computes
    reference: torch.nn.Module | None  # the frozen original model (None when the method does not need it)
    forget: torch.Tensor  # all forget blocks, CPU
    device: torch.device
    dtype: torch.dtype
    seed: int
    params: dict[str, float]  # every hyperparameter the method declares, defaults filled in
    eval_batch_size: int


@dataclass
class Batch:
    forget: torch.Tensor | None  # [B, T] on device
    forget_rows: torch.Tensor | None  # [B] row indices into the forget set, for precomputed targets
    retain: torch.Tensor | None  # [B, T] on device


class UnlearningMethod:
    """Base class: subclasses set the class attributes and implement `loss`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_forget: ClassVar[bool] = True
    has_retain_term: ClassVar[bool] = False  # the retain term is weighted by retain_weight (λ)
    uses_retain: ClassVar[bool] = False  # reads retain batches at all (retain_finetune does, without λ)
    needs_reference: ClassVar[bool] = False
    reference_distributions: ClassVar[bool] = False  # holds the reference's full next-token distributions (KL)
    full_logit_streams: ClassVar[int] = 0  # batches whose loss needs [B, T, V] logits (not chunked log-probs)
    partial_forward: ClassVar[bool] = False  # `training_module`'s forward leaves later layers and the head unused
    own: ClassVar[tuple[Hyperparameter, ...]] = ()  # the method's own knobs, declared in its file

    def __init__(self) -> None:
        self.ctx: MethodContext | None = None

    @classmethod
    def space(cls) -> tuple[Hyperparameter, ...]:
        """Everything searched for this method: the shared knobs, λ when it has a retain term, its own."""
        return SHARED + ((RETAIN_WEIGHT,) if cls.has_retain_term else ()) + cls.own

    @classmethod
    def hyperparameters(cls) -> list[str]:
        return [hp.name for hp in cls.space()]

    @classmethod
    def settings(cls, given: dict[str, float]) -> dict[str, float]:
        """`given` completed with defaults and checked; an unknown name is an error naming this method."""
        return complete(cls.space(), given, f"method '{cls.name}'")

    def prepare(self, ctx: MethodContext) -> None:
        """Keep the run's context; a depth-relative knob the run did not set (`Hyperparameter.depth`) gets its
        default for this model's depth here, the first point where the model is known."""
        relative = [hp for hp in self.space() if hp.depth is not None and hp.name not in ctx.params]
        if relative:
            layers = int(fingerprint(ctx.model.config.get_text_config())["layers"])
            defaults = {hp.name: hp.at_depth(layers).default for hp in relative}
            declared = [hp.name for hp in self.space()]
            ctx.params = {**{n: ctx.params.get(n, defaults.get(n)) for n in declared
                             if n in ctx.params or n in defaults}, **ctx.params}
        self.ctx = ctx

    def training_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What `loss` is called with, and what data parallelism wraps: the model itself, or, for a method whose
        forward pass stops early, a module around it whose forward completes (DDP prepares the gradient
        all-reduce after the forward returns; an exception raised out of it skips that step)."""
        return model

    def value(self, hp: Hyperparameter) -> float:
        """This run's value of one of the method's hyperparameters."""
        return self.ctx.params[hp.name]

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        raise NotImplementedError


def no_grad(fn: _F) -> _F:
    """`torch.no_grad()` as a decorator that imports torch when the function runs, not when it is defined."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def nll_term(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch of blocks, chunked through the output head (`tuner.engine.lossfn`): no
    `[B, T, V]` logits are kept for the backward pass."""
    from tuner.engine.lossfn import next_token_ce

    return next_token_ce(model, ids, ids[:, 1:])


def token_nll_term(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL `[B, T-1]` of a batch of blocks, differentiable and chunked like `nll_term`:
    for methods that sum it per sequence (NPO, SimNPO) or weight it per token (WGA)."""
    from tuner.engine.lossfn import next_token_ce_tokens

    return next_token_ce_tokens(model, ids, ids[:, 1:])


def target_ce_term(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy toward `targets`: hard labels `[B, T-1]` (chunked, like `nll_term`) or
    distributions `[B, T-1, V]` (on the full logits: the targets are full-vocabulary already)."""
    import torch
    import torch.nn.functional as F

    from tuner.engine.lossfn import next_token_ce, next_token_logits

    if targets.dtype == torch.long:
        return next_token_ce(model, ids, targets)
    logits = next_token_logits(model, ids).float()
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def kl_term(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token forward KL(P_reference || P_model), averaged over tokens (blocks carry no padding).

    Exact, on both models' full logits: it needs whole distributions, so it is not chunked and holds
    several fp32 `[B, T-1, V]` tensors (see bench/README.md for what that costs at vocab 128k)."""
    import torch
    import torch.nn.functional as F

    from tuner.engine.lossfn import next_token_logits

    with torch.no_grad():
        ref_logp = F.log_softmax(next_token_logits(reference, ids).float(), dim=-1)
    logp = F.log_softmax(next_token_logits(model, ids).float(), dim=-1)
    return F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).mean()


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout), every submodule's mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@no_grad
def precompute_labels(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device,
                      pick) -> torch.Tensor:
    """Run `model` (in eval mode) over all blocks once and keep `pick(logits, ids)` (hard labels) per block, on
    CPU."""
    import torch

    from tuner.engine.lossfn import next_token_logits

    out = []
    with evaluating(model):
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            out.append(pick(next_token_logits(model, ids).float(), ids).cpu())
    return torch.cat(out)
