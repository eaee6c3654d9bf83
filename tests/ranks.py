"""Trials on 2 ranks of a gloo process group started with torch.multiprocessing (no Ray: a group starts in
seconds), for tests that compare a sharded run with one process. One group start runs a batch of jobs, each a
`run_unlearning` from pristine weights; rank 0 saves every job's result."""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tuner.engine.data import UnlearnData


def small_data(data: UnlearnData, train: int = 16, held: int = 8) -> UnlearnData:
    """The first blocks of every set of `data`: a few steps and a full evaluation stay well under a second."""
    return UnlearnData(
        forget=data.forget[:train], unseen=data.unseen[:held], forget_eval=data.forget[:held],
        retain_train={k: v[:train] for k, v in data.retain_train.items()},
        retain_eval={k: v[:held] for k, v in data.retain_eval.items()},
        forget_zlib=data.forget_zlib[:held], unseen_zlib=data.unseen_zlib[:held], block_size=data.block_size,
        sources=dict(data.sources))


def run_job(original: torch.nn.Module, data: UnlearnData, baseline: dict[str, float],
            job: dict[str, Any]) -> dict[str, Any]:
    """One run of `job` (UnlearnConfig fields) from a private copy of `original` (FSDP2 shards models in place,
    so no copy is reused), as the trial engine runs it: the policy and its reference come from a Workbench."""
    from tuner.core.precision import resolve_precision
    from tuner.engine.models import Workbench
    from tuner.engine.unlearn import UnlearnConfig, run_unlearning

    cfg = UnlearnConfig(**job)
    bench = Workbench(copy.deepcopy(original), None, None)
    model, reference = bench.trainee(cfg, resolve_precision(cfg.precision, torch.device(cfg.device)))
    result = run_unlearning(model, data, cfg, reference=reference, baseline=baseline)
    return {"status": result.status, "metrics": result.metrics, "curve": result.curve,
            "environment": {k: result.environment[k] for k in ("world_size", "sharding", "effective_batch")}}


def _rank_main(rank: int, world: int, port: int, payload_path: str, out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    # a rank that fails alone leaves the other waiting in a collective: the timeout ends that wait
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        payload = torch.load(payload_path, weights_only=False)
        results = {}
        for key, job in payload["jobs"].items():
            try:
                results[key] = run_job(payload["original"], payload["data"], payload["baseline"], job)
            except Exception as err:  # reported per job; the test of that job fails with it
                results[key] = {"error": f"{type(err).__name__}: {err}"}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def run_on_ranks(original: torch.nn.Module, data: UnlearnData, baseline: dict[str, float],
                 jobs: dict[str, dict[str, Any]], workdir: Path, port: int, world: int = 2) -> dict[str, Any]:
    """Every job on `world` ranks (one process group for all of them); results by job key."""
    import torch.multiprocessing as mp

    payload, out = workdir / "payload.pt", workdir / "results.pt"
    torch.save({"original": original, "data": data, "baseline": baseline, "jobs": jobs}, payload)
    mp.spawn(_rank_main, args=(world, port, str(payload), str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=False)
