"""Out of memory on a real device: a trial with an oversized batch fails with advice, and the same worker
process then runs a normal trial (what a Ray worker does when it is reused for the next trial).

Runs `tuner.study.trial.prepare` and `tuner.study.trial.run_trial` in-process (no Ray needed), on the micro testbed.
On a GPU the oversized batch raises torch.OutOfMemoryError; on a CPU the allocator refuses it.

    python bench/oom_recovery.py --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from tuner.core.hparams import EPOCHS, LR
from tuner.core.settings import RunSettings
from tuner.study.context import TrialContext
from tuner.study.spec import StudySpec
from tuner.study.trial import prepare, run_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--oversized", type=int, default=None, help="batch size that cannot fit (GPU 2**23, CPU 2**21)")
    args = ap.parse_args()
    study = TrialContext.of(StudySpec(name="oom", model="testbed:micro", methods=["ga_gd"],
                                      retain_sources=["in_distribution"], run=RunSettings(device=args.device)))
    unit = next(iter(study.units))
    prepared = prepare(study)
    cuda = torch.device(args.device).type == "cuda"
    oversized = args.oversized or (2**23 if cuda else 2**21)

    def allocated() -> str:
        return f"{torch.cuda.memory_allocated() / 2**20:.0f} MiB allocated" if cuda else "cpu"

    print(f"device {args.device}: {torch.cuda.get_device_name() if cuda else 'cpu'}; after prepare: {allocated()}")
    big = dataclasses.replace(study, run=study.run.model_copy(update={"batch_size": oversized}))
    started = time.perf_counter()
    failed = run_trial({"unit": unit, LR.name: 5e-4, EPOCHS.name: 1}, big, prepared, lambda _r: None)
    print(f"oversized batch {oversized}: status {failed.status} in {time.perf_counter() - started:.1f} s; "
          f"{allocated()}\n  reason: {failed.payload['reason']}")
    started = time.perf_counter()
    ok = run_trial({"unit": unit, LR.name: 5e-4, EPOCHS.name: 2}, study, prepared, lambda _r: None)
    m = ok.metrics or {}
    print(f"next trial, same process, batch {study.run.batch_size}: status {ok.status} in "
          f"{time.perf_counter() - started:.1f} s; forget gap {m.get('forget_gap', float('nan')):+.3f}; {allocated()}")


if __name__ == "__main__":
    main()
