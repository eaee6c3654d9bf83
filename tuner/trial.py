"""What runs on Ray workers: the once-per-study preparation and one trial (`run_trial`: one `run_unlearning`;
`tuner.trainable` hands it to Ray Tune).

`prepare` runs once per study as a Ray task on a worker: it tokenises every set and evaluates the original
model (and, on the testbed, the exact-retrain model). Its result travels to the trials through Ray's object
store, so neither the tokenisation nor those evaluations repeat per trial or per worker. Each trial worker
loads the base model once per process (a module-level cache that survives across trials and search units
while Ray reuses the actor); every trial starts from a pristine copy of the weights. Workers read the model
and data themselves, so driver and workers need not share a filesystem; results travel back only through
`tune.report`.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch

from tuner import methods
from tuner.candidates import CONSTRAINT_PREFIX, constraint_values, objective_values
from tuner.data import DataSpec, UnlearnData, build_data
from tuner.evaluation import full_metrics
from tuner.memory import STUDY_MAX_WORKERS, device_capacity, model_shape, refusal, run_shape
from tuner.memory import plan as memory_plan
from tuner.models import Workbench, fingerprint, load, resolve
from tuner.precision import PrecisionPlan, resolve_precision
from tuner.robustness import check_candidate, retrain_relearning
from tuner.settings import RunSettings
from tuner.spec import Robustness, Target
from tuner.testbed import data_spec as testbed_data_spec
from tuner.unlearn import UnlearnConfig, resolve_device, run_unlearning

_WORKER: dict[str, Any] = {}


def hyperparameters_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameters: what the searcher suggested, without the search unit it is routed by."""
    return {k: v for k, v in config.items() if k != "unit"}


def _device_and_precision(study: dict[str, Any]) -> tuple[torch.device, PrecisionPlan]:
    settings = RunSettings.model_validate(study["run"])
    device = resolve_device(settings.device)
    return device, resolve_precision(settings.precision, device)


def workbench(study: dict[str, Any]) -> Workbench:
    """The base model on this worker's device in the compute dtype, loaded once per process."""
    device, precision = _device_and_precision(study)
    key = (study["model"], bool(study.get("trust_remote_code", False)), precision.compute)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        bench = Workbench.open(study["model"], study.get("trust_remote_code", False), dtype=precision.compute)
        bench.original.to(device)
        _WORKER.update(key=key, bench=bench)
    return _WORKER["bench"]


def memory_refusal(study: dict[str, Any], method: str, block_size: int) -> str | None:
    """Before a trial loads anything: the one-line refusal when its memory plan cannot fit this worker's GPU."""
    device, precision = _device_and_precision(study)
    capacity = device_capacity(device)
    if capacity is None:
        return None
    capacity = int(capacity * study.get("gpu_share", 1.0))  # trials sharing a GPU share its memory
    settings = RunSettings.model_validate(study["run"])
    shape = model_shape(study["model"], settings, bool(study.get("trust_remote_code", False)))
    shards = study.get("workers", 1) if study.get("sharding") == "fsdp" else 1
    run = run_shape([methods.get(method)], settings, precision.name, block_size, workers=shards,
                    ranks=study.get("workers", 1))
    if memory_plan(shape, run, capacity).fits:
        return None
    return refusal(shape, run, capacity, STUDY_MAX_WORKERS)


def prepare(study: dict[str, Any]) -> dict[str, Any]:
    """Once per study: token blocks of every set, the original model's metrics and, on the testbed, the
    exact-retrain model's. The caller ships the result to every trial."""
    if study.get("threads"):
        torch.set_num_threads(int(study["threads"]))
    device, precision = _device_and_precision(study)
    dtype = precision.compute
    # not cached: runs once
    bench = Workbench.open(study["model"], study.get("trust_remote_code", False), dtype=dtype)
    bench.original.to(device)
    if study["data"] is not None:
        spec = DataSpec.model_validate(study["data"])
    else:
        spec = testbed_data_spec(bench.source.testbed_root)
    data = build_data(spec, bench.tokenizer, bench.reference.config, seed=study["seed"])
    batch = study["run"].get("eval_batch_size", 16)
    baseline = full_metrics(bench.reference, data, batch, device, dtype)
    exact = None
    if bench.source.retrain_path is not None:
        retrain, _ = load(resolve(str(bench.source.retrain_path)), torch_dtype=dtype)
        exact = full_metrics(retrain.to(device), data, batch, device, dtype)
        checks = Robustness.model_validate(study.get("robustness") or {})
        if checks.enabled("relearn"):  # the yardstick of every candidate's relearning speed, once per study
            exact["relearn"] = retrain_relearning(retrain, data, checks.relearn, study["seed"], device, dtype, batch)
        del retrain
    summary = {"blocks": data.summary(), "sources": data.sources, "sha256": data.fingerprints(),
               "model": fingerprint(bench.reference.config)}
    return {"data": data, "baseline": baseline, "exact_retrain": exact, "data_summary": summary}


def run_trial(params: dict[str, Any], study: dict[str, Any], prepared: dict[str, Any], report) -> dict[str, Any]:
    """Run one trial of the search unit named in `params["unit"]` and hand every curve point and the final
    result to `report` (tune.report in Ray)."""
    if study.get("threads"):
        torch.set_num_threads(int(study["threads"]))
    unit = study["units"][params["unit"]]
    data: UnlearnData = prepared["data"]
    objectives = study["objectives"]
    refused = memory_refusal(study, unit["method"], data.block_size)
    if refused is not None:
        final = {"kind": "final", "status": "failed", "payload": {"reason": refused},
                 **objective_values(None, objectives)}
        report(final)
        return final
    bench = workbench(study)
    baseline = prepared["baseline"]
    cfg = UnlearnConfig(method=unit["method"], retain_source=unit["retain_source"] or "in_distribution",
                        seed=study["seed"], params=hyperparameters_of(params),
                        world_size=study.get("workers", 1),
                        sharding=study.get("sharding", "ddp"), **study["run"])

    def on_eval(point: dict[str, float]) -> None:
        # a curve point is stored, not told to the searcher: only the final result carries objectives
        report({"kind": "curve", "curve_point": point})

    try:
        model, reference = bench.trainee(cfg, _device_and_precision(study)[1])
        result = run_unlearning(model, data, cfg, reference=reference, baseline=baseline, on_eval=on_eval)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not _out_of_memory(err) or cfg.world_size > 1:  # a rank out of memory fails the whole trial (multiworker)
            raise
        final = {"kind": "final", "status": "failed", "payload": {"reason": _oom_reason(err, cfg)},
                 **objective_values(None, objectives)}
        _release_memory()
        report(final)
        return final
    payload = result.to_dict()
    payload.setdefault("environment", {}).update(host=socket.gethostname(), ray_node=_ray_node())
    checked = dict(result.metrics or {})
    if result.metrics is not None and should_check(study, result.metrics):
        payload["checks"] = {"step": result.selected_step, **robustness_checks(model, data, study, prepared, cfg,
                                                                                   result.metrics)}
        checked.update(payload["checks"]["metrics"])
    # flat keys, like the objectives: Tune flattens nested results before the searcher sees them
    target = Target.model_validate(study["target"]).rule(prepared.get("exact_retrain"))
    constraints = constraint_values(checked, target) if result.metrics else {}
    final = {"kind": "final", "status": result.status, "payload": payload, **objective_values(result.metrics, objectives),
             **{f"{CONSTRAINT_PREFIX}{k}": v for k, v in constraints.items()}}
    report(final)
    return final


def rerun(config: dict[str, Any], study: dict[str, Any], prepared: dict[str, Any], checks: bool) -> dict[str, Any]:
    """A candidate's setting run again on a worker after the trials (`tuner.rechecks`): another seed for the
    seed spread, or the same run to check a Pareto candidate whose weights no trial kept.
    Returns {"metrics": ..., "checks": ... or None}."""
    started = time.perf_counter()
    if study.get("threads"):
        torch.set_num_threads(int(study["threads"]))
    bench = workbench(study)
    cfg = UnlearnConfig.model_validate({**config, "device": study["run"].get("device", "auto")})
    model, reference = bench.trainee(cfg, _device_and_precision(study)[1])
    result = run_unlearning(model, prepared["data"], cfg, reference=reference, baseline=prepared["baseline"])
    out = {"metrics": result.metrics, "checks": None, "status": result.status, "reason": result.reason}
    if checks and result.metrics is not None:
        out["checks"] = robustness_checks(model, prepared["data"], study, prepared, cfg, result.metrics)
    out["time_s"] = time.perf_counter() - started  # the re-run is part of what the check costs
    return out


def should_check(study: dict[str, Any], metrics: dict[str, float]) -> bool:
    """Whether this trial's kept checkpoint gets the robustness checks (`robustness.when`). Trials sharded over
    several ranks are not checked: the attack and quantization copy the whole model on one device."""
    spec = Robustness.model_validate(study.get("robustness") or {})
    if spec.when in ("off", "pareto_at_end") or not spec.checks or int(study.get("workers", 1)) > 1:
        return False
    return spec.when == "every_trial" or abs(metrics["forget_gap"]) <= study["target"]["gap_tolerance"]


def robustness_checks(model: torch.nn.Module, data: UnlearnData, study: dict[str, Any], prepared: dict[str, Any],
                      cfg: UnlearnConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """The study's checks of the model as the trial left it (its kept checkpoint)."""
    spec = Robustness.model_validate(study.get("robustness") or {})
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    return check_candidate(model, data, spec.checks, spec.relearn, spec.quantization,
                           (prepared.get("exact_retrain") or {}).get("relearn"), prepared["baseline"],
                           metrics, cfg.seed, device, precision.compute, cfg.eval_batch_size)


def _out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _oom_reason(err: BaseException, cfg: UnlearnConfig) -> str:
    """An out-of-memory trial is a setting the user can fix: say which, keeping the effective batch."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return (f"out of memory with batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} ({first}); "
            f"halve run.batch_size and double run.grad_accum: the same effective batch gives the same result")


def _release_memory() -> None:
    """Let the worker run its next trial after an OOM: drop the failed run's tensors and cached blocks."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ray_node() -> str | None:
    """Which Ray node ran the trial (hostnames repeat when several nodes share a machine)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None
