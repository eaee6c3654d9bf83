"""The Ray cluster a study runs on: starting or joining Ray, what one trial reserves, how many trials fit at
once, a refusal for a study no node can run, and the driver's stop on SIGINT/SIGTERM.

Ray's environment defaults for a study driver are set when this module is imported, before Ray is.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

# TUNE_DISABLE_SIGINT_HANDLER: Ctrl+C raises KeyboardInterrupt in the driver (handled as a stop, below)
# instead of Tune's own handler, which ends the run as if it had finished.
for _name, _value in (("RAY_AIR_NEW_OUTPUT", "0"), ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
                      ("RAY_DEDUP_LOGS", "0"), ("RAY_USAGE_STATS_ENABLED", "0"), ("TUNE_DISABLE_SIGINT_HANDLER", "1"),
                      # curve points carry no objectives (a trial reports only what it measured)
                      ("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")):
    os.environ.setdefault(_name, _value)

from tuner.core.errors import TunerError  # noqa: E402
from tuner.study.spec import StudySpec, ray_address_problem  # noqa: E402

DRIVER_CPU = 0.01  # a multi-worker trial's Tune actor only waits on Ray Train; its ranks hold the resources


class StudyStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver: the trials are stopped and the study is left resumable."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def start_ray(address: str | None) -> bool:
    """Start a local Ray, or join `address` (or RAY_ADDRESS). True when this call did so, False when Ray was
    already initialized in this process: the caller then shuts down only a Ray it started."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS")
    problem = ray_address_problem(address)
    if problem:
        raise TunerError(f"{'--address' if address != os.environ.get('RAY_ADDRESS') else 'RAY_ADDRESS'}: {problem}")
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # "local": a fresh instance even when `ray start` left a cluster on this machine (plain ray.init()
        # would join that one).
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
    return True


def worker_task(function: Any, spec: StudySpec) -> Any:
    """`function` as a Ray task with one trial's resources (the study's preparation, a calibration, a re-run).
    A task that holds a GPU ends its worker process when it returns (max_calls=1), so the CUDA memory it held
    is free before the next task or trial needs it; on CPUs the worker stays for the next task or trial, which
    then skips starting a process, importing torch and loading the model again (`trial.workbench`)."""
    import ray

    return ray.remote(max_calls=1 if spec.resources.gpus else 0)(function).options(
        num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """What Tune reserves for one trial. A one-worker trial runs in the Tune trial itself. A multi-worker
    trial's ranks are Ray Train workers in their own placement group; the Tune trial only drives them and
    reserves a token CPU share, so a trial's resources are not counted twice."""
    if spec.resources.workers > 1:
        return {"cpu": DRIVER_CPU, "gpu": 0}
    return {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}


def trial_concurrency(spec: StudySpec) -> int:
    """Trials at once, each counted whole: the spec's concurrency, capped by how many trials' worth of CPUs and
    GPUs the cluster has (multi-worker trials beyond that would only wait for a placement group). A local Ray
    that cannot hold one trial is refused rather than left waiting (a cluster may still be scaling up)."""
    import ray

    r = spec.resources
    if r.workers == 1:
        return spec.concurrency
    total = ray.cluster_resources()
    need = {"CPU": r.cpus * r.workers + DRIVER_CPU, **({"GPU": r.gpus * r.workers} if r.gpus else {})}
    fits = min(int(total.get(name, 0) // amount) for name, amount in need.items())
    if fits == 0 and not (spec.ray_address or os.environ.get("RAY_ADDRESS")):
        have = ", ".join(f"{total.get(name, 0):g} {name}" for name in need)
        raise TunerError(f"resources: one trial of {r.workers} workers needs "
                         f"{', '.join(f'{v:g} {k}' for k, v in need.items())} (workers x per-worker, plus "
                         f"{DRIVER_CPU} CPU for the trial itself) but this machine's Ray has {have}: lower "
                         "resources.cpus (fractions allowed) or resources.workers")
    return max(1, min(spec.concurrency, fits))


def check_resources(spec: StudySpec) -> None:
    """Refuse a study no node of the cluster can ever run a trial of (Ray would wait for it forever)."""
    import ray

    need = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise TunerError(f"resources: a trial asks for {need['CPU']:g} CPU and {need['GPU']:g} GPU, but no node of the "
                     f"Ray cluster has that (the largest has {largest.get('CPU', 0):g} CPU, "
                     f"{largest.get('GPU', 0):g} GPU); lower resources.cpus/resources.gpus or use a cluster that has them")


signals_received: list[int] = []  # Ray and Tune may re-raise a plain KeyboardInterrupt; this keeps which signal


def _raise_stopped(signum: int, _frame: Any) -> None:
    signals_received.append(signum)
    raise StudyStopped(signum)


def stop_on_signals() -> dict[int, Any] | None:
    """SIGINT and SIGTERM raise StudyStopped in the driver, so the study is marked interrupted and Ray shut
    down in order (only possible in the main thread; elsewhere the caller's handlers stay)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_stopped)
    return previous


def restore_signals(previous: dict[int, Any] | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def worker_death(err: BaseException) -> BaseException | None:
    """The Ray error behind a Tune run that died because a trial's worker did (Tune 2.x raises a
    RuntimeError for worker errors it does not expect, e.g. OutOfMemoryError), else None."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OutOfMemoryError | WorkerCrashedError | RayActorError):
            return cause
        cause = cause.__cause__
    return None
