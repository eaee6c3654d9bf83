"""A trial larger than one worker: Ray Train's `TorchTrainer`, launched from inside the Ray Tune trial.

The Tune trial (a function trainable) starts one TorchTrainer with `workers` ranks, each holding `cpus`/`gpus`
(per worker). Ray Train creates the process group (gloo on CPU, NCCL on GPU), places the ranks in one placement
group, and runs `_rank_main` on each; every rank runs the same `run_trial` as a one-worker trial, sharded by
`tuner.engine.distributed`. Rank 0's reports reach Tune through Ray Train's `TuneReportCallback`; the other ranks join
each report round with an empty dict (Ray Train collects one report per rank per round), so rank 0 alone
reports to Tune and, through the driver, to the store.

A rank that raises or dies fails the whole trial (no retries, fixed world size: a trial never resumes on another
number of ranks). The reason names the rank and its node, from the placement each rank records at start.
Only imported when a trial has more than one worker: the one-worker path never imports Ray Train.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from typing import Any

import torch

from tuner.study.context import TrialContext
from tuner.study.report import CurveReport, Report, TrialReport
from tuner.study.trial import run_trial

ENGINE = "ray.train.torch.TorchTrainer"
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def run_sharded_trial(params: dict[str, Any], ctx: TrialContext, prepared: dict[str, Any],
                      report: Report) -> TrialReport | None:
    """Run one trial over `ctx.workers` ranks; a failed rank becomes a failed trial with its reason
    (reported here, since no rank got to report it)."""
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    placement = Queue(actor_options={"num_cpus": 0})
    trainer = torch_trainer(_rank_main, {"params": params, "ctx": ctx, "prepared": prepared,
                                         "placement": placement},
                            ctx.workers, ctx.cpus, ctx.gpus,
                            callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
        return None
    except TrainingFailedError as err:
        ranks = _drain(placement)
        final = TrialReport.failed(rank_failure_reason(err, ranks), ctx.objectives,
                                   environment=sharded_environment(ctx, ranks))
        report(final)
        return final
    finally:
        placement.shutdown(force=True)


def torch_trainer(rank_main, config: dict[str, Any], workers: int, cpus: float, gpus: float,
                  callbacks: list | None = None):
    """A TorchTrainer running `rank_main(config)` on `workers` ranks of `cpus`/`gpus` each, one attempt."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # A rank's `ray.train.report` waits until Ray Train's controller has taken its previous report, which it does
    # once per poll of the ranks (every 2 s by default): each curve point would hold every rank up to 2 s.
    # Ray Train hands this variable on to its controller (set here, in the process that starts the trainer).
    os.environ.setdefault(POLL_ENV, POLL_S)

    per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return TorchTrainer(
        rank_main, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=per_worker),
        run_config=RunConfig(
            storage_path=os.path.join(tempfile.gettempdir(), "tuner-train"),
            # One attempt per trial: a retry would restart from step 0 and report the curve twice.
            failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
            callbacks=callbacks or []),
    )


def _rank_main(config: dict[str, Any]) -> None:
    """What every rank runs: record where it is, then the ordinary trial, reporting through Ray Train."""
    import ray
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    if torch.cuda.is_available() and config["ctx"].gpus:
        torch.cuda.set_device(ray.train.torch.get_device())
    where = {"rank": rank, "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
             "pid": os.getpid()}
    config["placement"].put(where)
    everyone: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, where)

    def report(result: CurveReport | TrialReport) -> None:
        if isinstance(result, TrialReport):
            environment = {**result.payload.get("environment", {}), "engine": ENGINE,
                           "ranks": [{k: r[k] for k in ("rank", "host", "node")} for r in everyone]}
            result = dataclasses.replace(result, payload={**result.payload, "environment": environment})
        ray.train.report(result.to_tune() if rank == 0 else {})

    run_trial(config["params"], config["ctx"], config["prepared"], report)


def rank_unlearn(config: dict[str, Any]) -> dict[str, Any]:
    """Every rank: one `run_unlearning` from a pristine copy of `config["model"]` (also the frozen reference)
    with `config["cfg"]`. Rank 0's return value is the trainer's `Result.return_value`. For benchmarks and tests
    of the sharded path."""
    import copy

    from tuner.engine.unlearn import UnlearnConfig, run_unlearning

    torch.set_num_threads(int(config.get("threads", 1)))
    model = copy.deepcopy(config["model"]).train().requires_grad_(True)
    result = run_unlearning(model, config["data"], UnlearnConfig(**config["cfg"]), reference=config["model"],
                            baseline=config.get("baseline"))
    return result.to_dict()


def _drain(placement) -> dict[int, dict[str, Any]]:
    """The placement every rank recorded before it could fail: rank -> host, node, pid."""
    out: dict[int, dict[str, Any]] = {}
    while not placement.empty():
        where = placement.get_nowait()
        out[where["rank"]] = where
    return out


def _died(error: BaseException) -> bool:
    """The rank's process died (killed, lost its node) rather than raising: Ray reports its actor as dead."""
    from ray.exceptions import RayActorError

    cause = getattr(error, "health_check_failure", None)  # Ray Train's wrapper of a failed worker poll
    return isinstance(error, RayActorError) or isinstance(cause, RayActorError)


def rank_failure_reason(err: BaseException, ranks: dict[int, dict[str, Any]]) -> str:
    """One line naming the failed rank(s) and node(s). A rank that died is named before the ranks that then
    failed in a collective with it (they only saw a closed connection)."""
    failures: dict[int, BaseException] = dict(getattr(err, "worker_failures", None) or {})
    if not failures:
        return f"multi-worker trial failed: {_first_line(err)}"
    died = sorted(r for r, e in failures.items() if _died(e))
    culprits = died or sorted(failures)
    parts = []
    for r in culprits:
        where = ranks.get(r, {})
        node = f"node {where.get('host', '?')} ({str(where.get('node', '?'))[:12]})"
        what = "died" if r in died else f"failed: {_first_line(failures[r])}"
        parts.append(f"rank {r} on {node} {what}")
    others = sorted(set(failures) - set(culprits))
    tail = f"; then rank(s) {', '.join(map(str, others))} stopped with it" if others else ""
    return f"{'; '.join(parts)}{tail} (world size {len(ranks) or '?'})"


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def sharded_environment(ctx: TrialContext, ranks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What a failed multi-worker trial still records: its world size, effective batch, engine and strategy."""
    run, world = ctx.run, ctx.workers
    return {"world_size": world, "sharding": ctx.sharding, "engine": ENGINE,
            "batch_size": run.batch_size, "grad_accum": run.grad_accum,
            "effective_batch": run.batch_size * run.grad_accum * world,
            "ranks": [{k: ranks[r][k] for k in ("rank", "host", "node")} for r in sorted(ranks)]}
