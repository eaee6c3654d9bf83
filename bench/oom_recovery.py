"""Out of memory on a real device: a trial with an oversized batch fails with advice, and the same worker
process then runs a normal trial (what a Ray worker does when it is reused for the next trial).

Runs `tuner.study.trial.prepare` and `tuner.study.trial.run_trial` in-process (no Ray needed), on the micro testbed.
On a CPU the allocator refuses the oversized batch. On a GPU the trial's memory plan would refuse a batch that
cannot fit the card before anything runs, so the oversized trial runs with the CUDA allocator capped
(`torch.cuda.set_per_process_memory_fraction`) to `--cap-gib`: the plan passes against the whole card and
the allocator raises torch.OutOfMemoryError mid-step, as on a card that other work fills.

    python bench/oom_recovery.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch

from tuner.core.hparams import EPOCHS, LR
from tuner.core.settings import RunSettings
from tuner.study.context import TrialContext
from tuner.study.spec import StudySpec
from tuner.study.trial import prepare, run_trial

OVERSIZED = {"cuda": 2**14, "cpu": 2**21}  # blocks per batch: over the capped GPU allocator, over a host's memory
CAP_GIB = 1.0


@contextlib.contextmanager
def capped_allocator(device: torch.device, cap_gib: float) -> Iterator[None]:
    """The CUDA allocator limited to `cap_gib` (the card's capacity, which the plan reads, unchanged)."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def oom_then_recover(device_name: str, oversized: int | None = None, cap_gib: float = CAP_GIB,
                     log=print) -> dict[str, Any]:
    """An oversized `ga_gd` trial, then a normal one in the same process: both trial reports and timings."""
    study = TrialContext.of(StudySpec(name="oom", model="testbed:micro", methods=["ga_gd"],
                                      retain_sources=["in_distribution"], run=RunSettings(device=device_name)))
    unit = next(iter(study.units))
    prepared = prepare(study)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    oversized = oversized or OVERSIZED[device.type]

    def allocated() -> str:
        return f"{torch.cuda.memory_allocated() / 2**20:.0f} MiB allocated" if cuda else "cpu"

    log(f"device {device_name}: {torch.cuda.get_device_name() if cuda else 'cpu'}; after prepare: {allocated()}")
    big = dataclasses.replace(study, run=study.run.model_copy(update={"batch_size": oversized}))
    started = time.perf_counter()
    with capped_allocator(device, cap_gib):
        failed = run_trial({"unit": unit, LR.name: 5e-4, EPOCHS.name: 1}, big, prepared, lambda _r: None)
    failed_s = time.perf_counter() - started
    cap = f" (allocator capped at {cap_gib:g} GiB)" if cuda else ""
    log(f"oversized batch {oversized}{cap}: status {failed.status} in {failed_s:.1f} s; {allocated()}\n"
        f"  reason: {failed.payload.get('reason')}")
    started = time.perf_counter()
    ok = run_trial({"unit": unit, LR.name: 5e-4, EPOCHS.name: 2}, study, prepared, lambda _r: None)
    ok_s = time.perf_counter() - started
    m = ok.metrics or {}
    log(f"next trial, same process, batch {study.run.batch_size}: status {ok.status} in {ok_s:.1f} s; forget gap "
        f"{m.get('forget_gap', float('nan')):+.3f}; {allocated()}")
    return {"oversized": oversized, "capped_gib": cap_gib if cuda else None, "failed": failed, "failed_s": failed_s,
            "next": ok, "next_s": ok_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--oversized", type=int, default=None,
                    help=f"batch size that cannot fit (default: GPU {OVERSIZED['cuda']}, CPU {OVERSIZED['cpu']})")
    ap.add_argument("--cap-gib", type=float, default=CAP_GIB, help="GPU only: the allocator's cap for that trial")
    args = ap.parse_args()
    oom_then_recover(args.device, args.oversized, args.cap_gib)


if __name__ == "__main__":
    main()
