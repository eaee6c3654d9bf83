"""What runs on Ray workers: the once-per-study preparation and one trial (`run_trial`: one `run_unlearning`;
`tuner.study.trainable` hands it to Ray Tune).

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

from tuner.core.fingerprint import fingerprint
from tuner.core.settings import RunSettings
from tuner.engine import methods
from tuner.engine.data import UnlearnData, build_data
from tuner.engine.evaluation import full_metrics, leak_figures, original_metrics
from tuner.engine.memory import RunPlan, device_capacity, model_shape, resolve_eval_batch
from tuner.engine.models import Workbench, load, resolve
from tuner.engine.robustness import check_candidate, retrain_relearning
from tuner.engine.testbed import data_spec as testbed_data_spec
from tuner.engine.unlearn import UnlearnConfig, run_unlearning, verbmem_plan
from tuner.results.candidates import constraint_values, objective_values
from tuner.study.context import TrialContext
from tuner.study.report import CurveReport, Report, TrialReport

_WORKER: dict[str, Any] = {}


def hyperparameters_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameters: what the searcher suggested, without the search unit it is routed by."""
    return {k: v for k, v in config.items() if k != "unit"}


def workbench(ctx: TrialContext) -> Workbench:
    """The base model on this worker's device in the compute dtype, loaded once per process."""
    key = (ctx.model, ctx.trust_remote_code, ctx.precision.compute)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        bench = Workbench.open(ctx.model, ctx.trust_remote_code, dtype=ctx.precision.compute)
        bench.original.to(ctx.device)
        _WORKER.update(key=key, bench=bench)
    return _WORKER["bench"]


def memory_refusal(ctx: TrialContext, method: str, block_size: int, run: RunSettings | None = None,
                   ranks: int | None = None) -> str | None:
    """Before a trial loads anything: the one-line refusal when its memory plan cannot fit this worker's GPU.
    `run` and `ranks` plan another run on the same worker (a one-process calibration of a sharded study)."""
    capacity = device_capacity(ctx.device)
    if capacity is None:
        return None
    capacity = int(capacity * ctx.gpu_share)  # trials sharing a GPU share its memory
    run, ranks = run or ctx.run, ctx.workers if ranks is None else ranks
    shards = ctx.shards if ranks == ctx.workers else 1
    return RunPlan.assemble(model_shape(ctx.model, run, ctx.trust_remote_code), [methods.get(method)], run,
                            ctx.precision.name, block_size, capacity, shards=shards, ranks=ranks).refusal()


def prepare(ctx: TrialContext) -> dict[str, Any]:
    """Once per study: token blocks of every set, the original model's metrics and, on the testbed, the
    exact-retrain model's. The caller ships the result to every trial."""
    torch.set_num_threads(ctx.threads)
    device, dtype = ctx.device, ctx.precision.compute
    # not cached: runs once
    bench = Workbench.open(ctx.model, ctx.trust_remote_code, dtype=dtype)
    bench.original.to(device)
    spec = ctx.data if ctx.data is not None else testbed_data_spec(bench.source.testbed_root)
    data = build_data(spec, bench.tokenizer, bench.reference.config, seed=ctx.seed)
    batch = resolve_eval_batch(ctx.run, bench.reference.config, [methods.get(u.method) for u in ctx.units.values()],
                               ctx.precision.name, data.block_size)
    exact = None
    # the testbed's retrain model never saw the forget set only when the forget set is the testbed's own
    if bench.source.retrain_path is not None and ctx.data is None:
        retrain, _ = load(resolve(str(bench.source.retrain_path)), torch_dtype=dtype)
        exact = full_metrics(retrain.to(device), data, batch, device, dtype, mink_k=ctx.run.mink_k,
                             verbmem=verbmem_plan(ctx.run, bench.tokenizer.decode))
        exact.update(leak_figures(exact, exact["mia_auc_mink"]))
        checks = ctx.robustness
        if checks.enabled("relearn"):  # the yardstick of every candidate's relearning speed, once per study
            exact["relearn"] = retrain_relearning(retrain, data, checks.relearn, ctx.seed, device, dtype, batch)
        del retrain
    baseline, original = original_metrics(bench.reference, data, batch, device, dtype, leak_reference(exact),
                                          ctx.run.mink_k, verbmem_plan(ctx.run, bench.tokenizer.decode))
    summary = {"blocks": data.summary(), "sources": data.sources, "sha256": data.fingerprints(),
               "model": fingerprint(bench.reference.config)}
    return {"data": data, "baseline": baseline, "original": original, "exact_retrain": exact,
            "data_summary": summary}


def leak_reference(exact_retrain: dict[str, Any] | None) -> float | None:
    """The AUC a study's privleak is relative to: the exact retrain's min-k AUC where there is one (None: the
    approximate target's)."""
    return (exact_retrain or {}).get("mia_auc_mink")


def compared(prepared: dict[str, Any]) -> dict[str, Any]:
    """`run_unlearning`'s yardsticks from a study's preparation: the original model's metrics and per-block
    NLL, and privleak's reference."""
    return {"baseline": prepared["baseline"], "original": prepared.get("original"),
            "leak_reference": leak_reference(prepared.get("exact_retrain"))}


def run_trial(params: dict[str, Any], ctx: TrialContext, prepared: dict[str, Any], report: Report) -> TrialReport:
    """Run one trial of the search unit named in `params["unit"]`, hand every curve point and the final
    report to `report` (to Tune, by `tuner.study.trainable`), and return the final report."""
    torch.set_num_threads(ctx.threads)
    data: UnlearnData = prepared["data"]
    cfg = ctx.config(params["unit"], hyperparameters_of(params))
    refused = memory_refusal(ctx, cfg.method, data.block_size)
    if refused is not None:
        report(final := TrialReport.failed(refused, ctx.objectives))
        return final

    def on_eval(point: dict[str, float]) -> None:
        # a curve point is stored, not told to the searcher: only the final result carries objectives
        report(CurveReport(point))

    try:
        bench = workbench(ctx)
        model, reference = bench.trainee(cfg, ctx.precision)
        result = run_unlearning(model, data, cfg, reference=reference, on_eval=on_eval,
                                decode=bench.tokenizer.decode, **compared(prepared))
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not out_of_memory(err) or cfg.world_size > 1:  # a rank out of memory fails the whole trial (multiworker)
            raise
        release_memory()
        report(final := TrialReport.failed(_oom_reason(err, cfg), ctx.objectives))
        return final
    payload = result.to_dict()
    payload.setdefault("environment", {}).update(host=socket.gethostname(), ray_node=_ray_node())
    checked = dict(result.metrics or {})
    if result.metrics is not None and should_check(ctx, result.metrics):
        payload["checks"] = {"step": result.selected_step, **robustness_checks(model, ctx, prepared, cfg,
                                                                                   result.metrics)}
        checked.update(payload["checks"]["metrics"])
    constraints = constraint_values(checked, ctx.rule(prepared.get("exact_retrain"))) if result.metrics else {}
    final = TrialReport(result.status, payload, objective_values(result.metrics, ctx.objectives), constraints)
    report(final)
    return final


def rerun(config: dict[str, Any], ctx: TrialContext, prepared: dict[str, Any], checks: bool) -> dict[str, Any]:
    """A candidate's setting run again on a worker after the trials (`tuner.study.rechecks`): a confirmation that
    scores a mid-run candidate in full, another seed for the seed spread, or the same run to check a Pareto
    candidate whose weights no trial kept. Returns {"metrics", "checks" (or None), "status", "reason", "time_s"}."""
    started = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    cfg = UnlearnConfig.model_validate({**config, "device": ctx.run.device})
    bench = workbench(ctx)
    model, reference = bench.trainee(cfg, ctx.precision)
    result = run_unlearning(model, prepared["data"], cfg, reference=reference, decode=bench.tokenizer.decode,
                            **compared(prepared))
    out = {"metrics": result.metrics, "checks": None, "status": result.status, "reason": result.reason}
    if checks and result.metrics is not None:
        out["checks"] = robustness_checks(model, ctx, prepared, cfg, result.metrics)
    out["time_s"] = time.perf_counter() - started  # the re-run is part of what the check costs
    return out


def should_check(ctx: TrialContext, metrics: dict[str, float]) -> bool:
    """Whether this trial's kept checkpoint gets the robustness checks (`robustness.when`). Trials sharded over
    several ranks are not checked: the attack and quantization copy the whole model on one device."""
    spec = ctx.robustness
    if spec.when in ("off", "pareto_at_end") or not spec.checks or ctx.workers > 1:
        return False
    return spec.when == "every_trial" or abs(metrics["forget_gap"]) <= ctx.target.gap_tolerance


def robustness_checks(model: torch.nn.Module, ctx: TrialContext, prepared: dict[str, Any], cfg: UnlearnConfig,
                      metrics: dict[str, float]) -> dict[str, Any]:
    """The study's checks of the model as the trial left it (its kept checkpoint)."""
    spec = ctx.robustness
    return check_candidate(model, prepared["data"], spec.checks, spec.relearn, spec.quantization,
                           (prepared.get("exact_retrain") or {}).get("relearn"), prepared["baseline"],
                           metrics, cfg.seed, ctx.device, ctx.precision.compute,
                           resolve_eval_batch(cfg, model.config, [methods.get(cfg.method)], ctx.precision.name,
                                              prepared["data"].block_size))


def out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _oom_reason(err: BaseException, cfg: UnlearnConfig) -> str:
    """An out-of-memory trial is a setting the user can fix: say which, keeping the effective batch."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return (f"out of memory with batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} ({first}); "
            f"halve run.batch_size and double run.grad_accum: the same effective batch gives the same result")


def release_memory() -> None:
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
