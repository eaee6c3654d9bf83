"""Step time of one trial on 1 worker and on N workers (Ray Train TorchTrainer, DDP), and the share of the
N-worker step spent communicating.

A benchmark, not a test. Every configuration trains the same GPT-2 style model (built from a config, the same
initial weights) with the project's loop `tuner.engine.training.run_loop` and `nll_term` as the loss, on the same
seeded random token batches, at the same effective batch:

  1 worker     the default one-process path (no Ray, no process group): batch B per step
  N workers    Ray Train TorchTrainer, DDP over gloo (CPU) or NCCL (GPU): batch B / N per rank per step, each
               rank training on its contiguous slice of the global batch (`tuner.engine.distributed`)
  N, no comm   the same N ranks with DDP's gradient all-reduce skipped (`no_sync`) and the loss not averaged:
               the same compute without the communication (the weights then drift apart; only timed)

communication share = (N workers - N no comm) / N workers, per step (medians). Warmup steps are not timed.
Each rank uses `--threads` intra-op threads; the 1-worker run uses the same number, so on a machine with
N × threads cores the N-worker run has N times the cores of the 1-worker run.

    python bench/multiworker_step.py                 # CPU: 1 and 2 workers, 1 thread each
    python bench/multiworker_step.py --workers 4 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from typing import Any

import torch

from tuner.engine.distributed import Ranks, StepSync, shard_model
from tuner.engine.methods.base import nll_term
from tuner.engine.training import LossOut, OptimConfig, run_loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="ranks of the multi-worker runs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (and for 1 worker)")
    p.add_argument("--batch", type=int, default=16, help="global blocks per step (divided among the ranks)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=cfg["vocab"], n_positions=cfg["seq"], n_embd=cfg["d_model"],
                                     n_layer=cfg["layers"], n_head=4, n_inner=4 * cfg["d_model"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(cfg["seed"])
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


class NoComm(StepSync):
    """The same ranks and slices, without the gradient all-reduce or the loss average: compute only."""

    def micro_batch(self, last: bool):
        return self.model.no_sync()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return values


def timed_steps(cfg: dict[str, Any]) -> list[float]:
    """Run warmup + steps optimiser steps on this process's share of every global batch; seconds per step."""
    torch.set_num_threads(cfg["threads"])
    ranks = Ranks.current()
    total = cfg["warmup"] + cfg["steps"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    batches = torch.randint(0, cfg["vocab"], (total, cfg["batch"], cfg["seq"]), generator=gen)
    rows = torch.arange(cfg["batch"])
    model = build_model(cfg).train()
    device = torch.device("cpu")
    train_model = shard_model(model, "ddp", device) if ranks.world > 1 else model
    sync = None if ranks.world == 1 else (NoComm if cfg["no_comm"] else StepSync)(train_model, ranks)
    stamps: list[float] = []

    def micro(step: int, _micro: int) -> LossOut:
        return LossOut(nll_term(train_model, batches[step, ranks.local_rows(rows)]))

    def after(step: int, _logs: dict[str, float]) -> bool:
        stamps.append(time.perf_counter())
        return False

    run_loop(train_model, micro, total, 1, OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"), device,
             after_step=after, sync=sync)
    return [b - a for a, b in zip(stamps[cfg["warmup"] - 1:], stamps[cfg["warmup"]:], strict=False)]


def on_ranks(cfg: dict[str, Any], workers: int) -> list[float]:
    """`timed_steps` on `workers` Ray Train ranks (rank 0's step times)."""
    from tuner.study.multiworker import torch_trainer

    return torch_trainer(timed_steps, cfg, workers=workers, cpus=cfg["threads"], gpus=0).fit().return_value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch % args.workers:
        raise SystemExit(f"--batch {args.batch} must divide among --workers {args.workers}")
    cfg = {k: getattr(args, k) for k in ("threads", "batch", "seq", "d_model", "layers", "vocab", "steps", "warmup",
                                         "seed")} | {"no_comm": False}
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.workers * args.threads + 1), include_dashboard=False,
             log_to_driver=False)
    try:
        one = timed_steps(cfg)
        many = on_ranks(cfg, args.workers)
        quiet = on_ranks(cfg | {"no_comm": True}, args.workers)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    t1, tn, tq = (statistics.median(x) for x in (one, many, quiet))
    tokens = args.batch * args.seq
    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"GPT-2 d{args.d_model} x {args.layers} layers, vocab {args.vocab}; global batch {args.batch} x {args.seq} "
          f"tokens; {args.threads} thread(s) per rank; {args.steps} timed steps after {args.warmup} warmup")
    print("| run | s/step (median) | tokens/s | spread |")
    print("| --- | ---: | ---: | ---: |")
    for name, xs, t in (("1 worker (no Ray)", one, t1), (f"{args.workers} workers, DDP gloo", many, tn),
                        (f"{args.workers} workers, all-reduce skipped", quiet, tq)):
        print(f"| {name} | {t:.4f} | {tokens / t:,.0f} | {(max(xs) - min(xs)) / t:.0%} |")
    print(f"speed-up {args.workers} workers / 1 worker: {t1 / tn:.2f}x; "
          f"communication share of the {args.workers}-worker step: {max(0.0, (tn - tq) / tn):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
