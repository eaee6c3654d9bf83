"""Data parallelism for one run sharded over ranks: who this process is, which rows of a global batch and which
evaluation blocks are its share, how the model is wrapped, and how the shares come back together.

Everything reads torch.distributed's own state: a process without a process group (world size 1, the default)
takes the plain path, where every row is its own and nothing is gathered. This module imports no Ray; the Ray
Train launch lives in `tuner.study.multiworker`.

Why results do not move with the world size (docs/cluster.md):
- the seeded `IndexStream` draws one *global* micro-batch of `batch_size × world` rows per micro-step, the same
  on every rank, and rank r trains on its contiguous slice r; one worker at `batch_size × world` (or at
  `batch_size` with `grad_accum × world`) sees the same rows in the same step;
- every method's loss is a mean over equally many tokens per rank, and DDP / FSDP2 average gradients over ranks,
  so the averaged gradient is the single-worker mean over the whole effective batch;
- evaluation blocks are split contiguously, scored, and the per-token NLL is gathered back in block order, so
  every metric (MIA AUC included) is computed once over all blocks, identically on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global micro-batch of `batch_size × world` row indices."""
        per = rows.numel() // self.world
        return rows[self.rank * per:(self.rank + 1) * per]


def backend() -> str | None:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _comm_device(like: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones through the host)."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like.device.type == "cpu" else torch.device("cpu")


def eval_share(blocks: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of `blocks`, padded with copies of the last block so every rank holds the
    same number: every rank then runs the same number of forward passes (FSDP2 all-gathers inside each) and
    all-gathers equal-sized results. `gather_rows` drops the padding."""
    ranks = Ranks.current()
    n = blocks.shape[0]
    if ranks.world == 1 or n == 0:
        return blocks
    per = -(-n // ranks.world)
    start, stop = min(n, ranks.rank * per), min(n, (ranks.rank + 1) * per)
    share = blocks[start:stop]
    if share.shape[0] < per:
        share = torch.cat([share, blocks[-1:].expand(per - share.shape[0], *blocks.shape[1:])])
    return share


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `eval_share` result, concatenated in rank order and trimmed to the `n` real rows (on CPU)."""
    ranks = Ranks.current()
    if ranks.world == 1 or n == 0:
        return local[:n]
    device = _comm_device(local)
    mine = local.to(device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts)[:n].cpu()


def shard_model(model: torch.nn.Module, strategy: Strategy, device: torch.device,
                forward: torch.nn.Module | None = None, partial: bool = False) -> torch.nn.Module:
    """The module to train: DDP around `model` (every rank holds all weights; gradients all-reduced), or
    `model` itself sharded in place by FSDP2 (`fully_shard` per transformer block, then the root).

    `forward` is the module the loss calls when it is not `model` itself (`UnlearningMethod.training_module`,
    which holds `model`): DDP then wraps it, and `partial` says its forward leaves some parameters without a
    gradient (a forward stopped at a layer), which DDP must look for each step. FSDP2 shards `model` in place
    either way and `forward` is returned as it is."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(forward or model, device_ids=ids, find_unused_parameters=partial)
    fully_shard_blocks(model)
    return forward or model


def fully_shard_blocks(model: torch.nn.Module) -> None:
    """FSDP2 units: every block Hugging Face marks as not to be split (`_no_split_modules`: the decoder layers),
    then the root, which takes the rest (embeddings, final norm, a tied head)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)


def reshard(model: torch.nn.Module) -> None:
    """Register the sharded parameters of every FSDP2 unit of `model` (a no-op elsewhere). FSDP2 keeps the
    root's parameters unsharded after a forward pass, expecting the backward; after a forward without one
    (evaluation, a method's precomputation) `parameters()` would hand out those full tensors instead of the
    shards the optimiser, the gradient clipping and the weight snapshots must see."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 shards nothing
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def scoring_mode(model: torch.nn.Module):
    """The no-gradient context to score `model` under: `torch.inference_mode` (no version counters, the
    cheapest), or `torch.no_grad` for an FSDP2-sharded model. FSDP2 keeps the root's unsharded parameters after a
    forward pass; allocated under inference mode they would be inference tensors, and the next training step's
    all-gather, which copies into them in place, would fail."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return torch.inference_mode()
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        return torch.no_grad()
    return torch.inference_mode()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2 weights), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of this rank's trainable weights (its shards under FSDP2; a LoRA run's adapters), for keeping
    the best evaluated step: frozen weights never change, so they are not copied."""
    reshard(model)
    return {n: _local(p).detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy a `snapshot_weights` copy back into the live weights (in place, so FSDP2 shards stay shards)."""
    reshard(model)
    for name, p in model.named_parameters():
        if name in saved:
            _local(p).copy_(saved[name])


class StepSync:
    """What the shared training loop asks of data parallelism: skip the gradient all-reduce on all but the last
    micro-batch of an optimiser step, and average the logged loss over ranks (every rank then logs, and decides
    divergence on, the same global mean)."""

    def __init__(self, model: torch.nn.Module, ranks: Ranks) -> None:
        self.model, self.ranks = model, ranks

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            with contextlib.nullcontext() if last else self.model.no_sync():
                yield
            return
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
        yield

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        device = _comm_device(values)
        out = values.detach().to(device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # SUM (gloo has no AVG), then one division
        return (out / self.ranks.world).to(values.device)
