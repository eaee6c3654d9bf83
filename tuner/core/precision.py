"""Numeric precision of a run: which dtype the trainable weights live in, and which dtype the math runs in.

Hub checkpoints are stored in bf16. An AdamW step of size ~lr on a bf16 weight of magnitude |w| is rounded
away whenever lr < |w| · 2^-8, which at the learning rates unlearning uses (1e-5 .. 1e-4) is most weights.
So the trainable copy never inherits the checkpoint's storage dtype: it follows `precision`.

- mixed: fp32 master weights and optimiser state, bf16 autocast compute (the default on a bf16-capable GPU);
- fp32:  fp32 weights and compute (the default on CPU, where results are exact);
- bf16:  bf16 weights, opt-in, with an AdamW that rounds stochastically so small updates survive on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from tuner.core.errors import TunerError

if TYPE_CHECKING:  # torch is imported where a precision is resolved, so the CLI parses flags without it
    import torch

Precision = Literal["auto", "mixed", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
PRECISION_HELP = ("auto (mixed on a bf16-capable GPU, else fp32), mixed (fp32 weights, bf16 compute), fp32, "
                  "or bf16 (bf16 weights, stochastic-rounding AdamW)")
# The optimiser goes with the precision: bf16 weights need one that keeps updates smaller than their ulp.
Optimizer = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
OPTIMIZER_HELP = ("adamw (torch's; on bf16 weights torchao's with stochastic rounding) or adamw8bit (torchao's "
                  "8-bit states: 2 instead of 8 bytes per trainable parameter)")
# The former `dtype` setting meant the autocast dtype; `bf16` there is what `mixed` is now.
LEGACY_DTYPE = {"auto": "auto", "fp32": "fp32", "bf16": "mixed"}


@dataclass(frozen=True)
class PrecisionPlan:
    """A resolved precision: the trainable weights' dtype and the compute (autocast, reference) dtype."""

    name: str
    weights: torch.dtype
    compute: torch.dtype


def resolve_precision(name: str, device: torch.device) -> PrecisionPlan:
    """`auto` picks mixed on a GPU that has bf16 and fp32 elsewhere; an explicit choice the device cannot
    honour is an error rather than a silent change."""
    import torch

    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        name = "mixed" if device.type == "cuda" and bf16_ok else "fp32"
    if name in ("mixed", "bf16") and not bf16_ok:
        raise TunerError(f"precision {name} needs bfloat16, which this GPU does not support (use precision: fp32)")
    if name == "fp32":
        return PrecisionPlan("fp32", torch.float32, torch.float32)
    if name == "mixed":
        return PrecisionPlan("mixed", torch.float32, torch.bfloat16)
    if name == "bf16":
        return PrecisionPlan("bf16", torch.bfloat16, torch.bfloat16)
    raise TunerError(f"unknown precision '{name}' (choose from: {', '.join(PRECISIONS)})")


def planned_precision(name: str, on_gpu: bool) -> str:
    """What `auto` becomes on the device a plan is made for, without needing that device here."""
    if name != "auto":
        return name
    return "mixed" if on_gpu else "fp32"


def legacy_dtype(doc: object) -> object:
    """Settings written before `precision` existed carry `dtype`; read them as the precision they meant."""
    if isinstance(doc, dict) and "dtype" in doc and "precision" not in doc and doc["dtype"] in LEGACY_DTYPE:
        doc = {**doc, "precision": LEGACY_DTYPE[doc["dtype"]]}
        doc.pop("dtype")
    return doc
