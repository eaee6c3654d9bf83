"""The learning-rate calibration before each search unit's trials: an unlearning LR range test.

One run per unit, as a Ray task with a trial's resources, with the lr rising geometrically step by step over the
unit's declared lr range (Smith's LR range test) and the forget gap evaluated every few steps (the utility as
the study's `run.eval_utility_every` says). `tuner.results.calibration.analyse` reads where the gap starts to
move, where it reaches the band and where the utility collapses; the unit's lr search range becomes the window
between the move and the collapse (log scale), its other hyperparameters untouched. A unit without a window is
not searched: the study says why in one line before it spends the budget. Its first trials are the brief's
guideline points: at 3, 2 and 1 epochs, the peak lr at which a trial sums a set multiple of the lr the ramp had
summed when the gap reached 0, with the run's other settings (`tuner.results.calibration.guideline`), whose
retain weight is its range's top (`run_params`).

The run costs one trial's steps at most (by default the steps of the unit's longest trial, at its top epochs),
plus its evaluations. The record (curve, finding, window) is stored with the unit's search, so a resumed study
searches the same window and Optuna's distribution stays the one its trials were drawn from; a search that began
without a calibration (a study of an older version) is not calibrated afterwards, for the same reason. A study of
several workers per trial calibrates in one process at the same effective batch, as its confirmations re-run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from tuner.core.hparams import EPOCHS, LR, RETAIN_WEIGHT, at_depth
from tuner.engine import methods
from tuner.engine.training import schedule_of
from tuner.engine.unlearn import UnlearnConfig, run_unlearning
from tuner.results.calibration import analyse, guideline, lr_text
from tuner.results.candidates import curve_estimate
from tuner.store import Store
from tuner.study.cluster import worker_task
from tuner.study.context import TrialContext
from tuner.study.spec import Calibration, Range, StudySpec
from tuner.study.trial import compared, memory_refusal, out_of_memory, release_memory, workbench

WINDOW, NO_WINDOW, SKIPPED, FAILED = "window", "no_window", "skipped", "failed"  # a record's `status`
GUIDELINE_EPOCHS = (1, 2, 3)  # the brief's guideline points: the calibrated lr at 1, 2 and 3 epochs
AT_TOP = (LR.name, EPOCHS.name, RETAIN_WEIGHT.name)  # the calibration run's knobs at their range's top (run_params)
POINT_KEYS = ("step", "lr", "lr_sum", "loss", "forget_nll", "unseen_nll", "forget_gap", "retain_nll", "utility_drop",
              "forget_gap_se", "utility_drop_se")


@dataclass(frozen=True)
class PlannedSearch:
    """A unit's search row before its trials: what the calibration needs to find and store."""

    unit: str
    method: str
    search_id: int
    optuna_name: str


def geometric_ramp(low: float, high: float, steps: int) -> Callable[[int], float]:
    """The lr of optimiser step `s` (0-based): `low` at the first step, `high` at the last, a constant factor
    between steps."""
    ratio = high / low

    def lr_at(s: int) -> float:
        return low * ratio ** (min(s, steps - 1) / max(1, steps - 1))

    return lr_at


def run_params(method: str, ranges: dict[str, Range], depth: int | None = None) -> dict[str, float | int]:
    """The calibration run's hyperparameters: each declared default, moved to the middle of its searched range
    when the range leaves it out (geometric middle on a log scale); the lr is the ramp's, the epochs the range's
    top (the longest trial, whose steps the ramp takes by default), and the retain weight the range's top.

    The guideline points run at these settings. Descent on retained data preserves utility (the brief's
    guideline 3) and a trial stops at the band, so the heaviest retain term costs steps, not utility: at the
    default weight of 1, GA+GD on the small testbed passed the utility tolerance by the time it reached the band
    and NPO's points on the micro testbed were stopped as collapsed, where at the top (10) every point of both
    inside the declared ranges reached the band within it (bench/README.md). `depth`: the model's decoder layers,
    for a depth-relative knob (left to its method's default when the depth is unknown)."""
    declared = methods.get(method).space()
    params: dict[str, float | int] = {}
    for hp in at_depth(declared, depth) if depth is not None else declared:
        rng = ranges.get(hp.name)
        value = hp.default
        if rng is not None and not rng.low <= value <= rng.high:
            value = math.sqrt(rng.low * rng.high) if rng.log else (rng.low + rng.high) / 2
        if hp.name in AT_TOP and rng is not None:
            value = rng.high
        if hp.depth is None:  # a depth-relative knob keeps the default its method scales to the model
            params[hp.name] = hp.cast(value)
    return params


def calibrate(unit: str, params: dict[str, Any], low: float, high: float, settings: Calibration,
              ctx: TrialContext, prepared: dict[str, Any]) -> dict[str, Any]:
    """On a worker: the unit's lr range test. Returns the record's measured part: {"status", "reason", "steps",
    "points", "diverged_lr", "schedule_sums", "time_s", "environment"}; "skipped" with the reason when one
    process cannot hold the run."""
    started = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    data = prepared["data"]
    cfg = ctx.config(unit, params)
    steps = settings.steps or cfg.total_steps(data.forget.shape[0])
    # one process at the trial's effective batch (batch_size x world size per micro-batch)
    cfg = UnlearnConfig.model_validate({
        **cfg.model_dump(), "batch_size": cfg.batch_size * cfg.world_size, "world_size": 1, "sharding": "ddp",
        "max_steps": steps, "eval_every": max(1, math.ceil(steps / settings.points)), "stop_at_target": False,
        # the ramp runs to its top lr: a trial's early stops (hopeless, collapsed) would cut it where it is
        # meant to look, and the analysis reads the collapse from the curve itself
        "prune_hopeless": False, "stop_on_collapse": False,
        "checkpoint": "last", "end_step": None, "device": ctx.run.device,
        "verbmem_blocks": None})  # the analysis reads the curve; generation would only cost
    refused = memory_refusal(ctx, cfg.method, data.block_size, run=cfg, ranks=1)
    if refused is not None:
        return {"status": SKIPPED, "reason": f"one process at the trial's effective batch does not fit: {refused}"}
    lr_at = geometric_ramp(low, high, steps)
    try:
        model, reference = workbench(ctx).trainee(cfg, ctx.precision)
        result = run_unlearning(model, data, cfg, reference=reference, lr_at=lr_at, **compared(prepared))
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        release_memory()
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        return {"status": SKIPPED, "reason": f"out of memory in one process at the trial's effective batch ({first})"}
    start = result.curve[0]
    subsampled = bool(result.subsampled)
    points = []
    for point in result.curve:
        measured = curve_estimate(point, start, subsampled)["metrics"]
        lr = lr_at(point["step"] - 1) if point["step"] else None
        lr_sum = math.fsum(lr_at(s) for s in range(point["step"]))
        points.append({k: v for k, v in {**point, **measured, "lr": lr, "lr_sum": lr_sum}.items() if k in POINT_KEYS})
    env = result.environment
    return {"status": "ran", "reason": result.reason, "steps": steps, "points": points,
            "diverged_lr": lr_at(result.diverged_step - 1) if result.diverged_step else None,
            "schedule_sums": schedule_sums(unit, params, ctx, data.forget.shape[0]),
            "time_s": time.perf_counter() - started,
            "environment": {k: env.get(k) for k in ("device", "device_name", "effective_batch", "precision")}}


def schedule_sums(unit: str, params: dict[str, Any], ctx: TrialContext, n_forget: int) -> dict[int, float]:
    """For each of the guideline points' epochs, a trial's lr multipliers summed over its steps: what its peak lr
    is multiplied by to give the lr it sums (`tuner.results.calibration.guideline`)."""
    sums = {}
    for epochs in GUIDELINE_EPOCHS:
        cfg = ctx.config(unit, {**params, EPOCHS.name: epochs})
        steps = cfg.total_steps(n_forget)
        factor = schedule_of(cfg.optim(1.0), steps)
        sums[epochs] = math.fsum(factor(s) for s in range(steps))
    return sums


def record(measured: dict[str, Any], low: float, high: float, ctx: TrialContext, params: dict[str, Any]
           ) -> dict[str, Any]:
    """What is stored for a unit: the run's curve with its finding (`tuner.results.calibration.analyse`) and
    window, and one line that says it."""
    base = {**measured, "range": {"low": low, "high": high}, "params": params}
    if measured["status"] != "ran":
        return {**base, "window": None, "finding": None,
                "summary": f"calibration {measured['status']}: {measured.get('reason')}; searching the declared lr "
                           f"range {lr_text(low)}..{lr_text(high)}"}
    found = analyse(measured["points"], low, high, ctx.target.gap_tolerance, ctx.target.utility_tolerance,
                    measured.get("diverged_lr"))
    window = {"low": found.low, "high": found.high} if found.found else None
    weight = (f", search.retain_weight (the run took its top, {params[RETAIN_WEIGHT.name]:g})"
              if RETAIN_WEIGHT.name in params else "")
    summary = found.summary() if found.found else (f"{found.refusal}; not searched (change search.lr, search.epochs"
                                                   f"{weight} or set calibration: false)")
    # at the run's other settings: the lr it summed to reach 0 was measured at those
    points = [{**params, LR.name: lr, EPOCHS.name: epochs}
              for epochs, lr in guideline(found, measured.get("schedule_sums") or {})]
    return {**base, "status": WINDOW if found.found else NO_WINDOW, "finding": found.to_dict(), "window": window,
            "guideline": points, "summary": summary}


def narrowed(stored: dict[str, Any] | None) -> dict[str, Range]:
    """The ranges a stored calibration replaces: the lr, with its window (log scale); none without a window."""
    window = (stored or {}).get("window")
    return {LR.name: Range(low=window["low"], high=window["high"], log=True)} if window else {}


def guideline_points(stored: dict[str, Any] | None) -> list[dict[str, float | int]]:
    """A stored calibration's guideline points (settings, longest horizon first), which a unit's search runs
    first; none without a window, or when the ramp's gap never reached 0."""
    if (stored or {}).get("status") != WINDOW:
        return []
    return list(stored.get("guideline") or [])


def refused(stored: dict[str, Any] | None) -> bool:
    """A unit whose calibration found no window is not searched."""
    return (stored or {}).get("status") == NO_WINDOW


def ensure(spec: StudySpec, store: Store, searches: list[PlannedSearch], storage: optuna.storages.BaseStorage,
           context: TrialContext, prepared: Any, depth: int | None,
           on_start: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Every unit's stored calibration, running those still to run (at most `concurrency` at once); a failed
    run is stored as such and its unit searches the declared range. Returns {unit: record}."""
    if not spec.calibration.enabled:
        return {}
    import ray

    data = ray.put(prepared) if not isinstance(prepared, ray.ObjectRef) else prepared
    stored = store.calibrations(spec.name)
    jobs = []
    for s in searches:
        if s.unit in stored:
            continue
        rng = spec.space_for(s.method, depth)[LR.name]
        if _began(storage, s.optuna_name):
            reason = "the unit's search began before any calibration; its lr range stays as its trials drew it"
        elif rng.low >= rng.high:
            reason = f"the lr range is the one value {lr_text(rng.low)}"
        else:
            jobs.append((s, rng, run_params(s.method, spec.space_for(s.method, depth), depth)))
            continue
        stored[s.unit] = _store(store, s, {"status": SKIPPED, "reason": reason, "window": None, "finding": None,
                                           "summary": f"calibration skipped: {reason}"})
    for start in range(0, len(jobs), spec.concurrency):
        batch = jobs[start:start + spec.concurrency]
        for s, _, _ in batch:
            if on_start is not None:
                on_start(s.unit)
        for (s, rng, params), measured in zip(batch, _run(spec, batch, context, data), strict=True):
            rec = record(measured, rng.low, rng.high, context, params)
            stored[s.unit] = _store(store, s, rec, spec.space_for(s.method, depth) | narrowed(rec))
    return stored


def _began(storage: optuna.storages.BaseStorage, optuna_name: str) -> bool:
    """Whether the unit's Optuna study holds trials (drawn from the ranges as they were)."""
    try:
        return bool(optuna.load_study(study_name=optuna_name, storage=storage).trials)
    except KeyError:
        return False


def _store(store: Store, search: PlannedSearch, rec: dict[str, Any], space: dict[str, Range] | None = None
           ) -> dict[str, Any]:
    store.set_calibration(search.search_id, rec, {k: r.model_dump() for k, r in space.items()} if space else None)
    return rec


def _run(spec: StudySpec, batch: list[tuple[PlannedSearch, Range, dict[str, Any]]], context: TrialContext,
         prepared: Any) -> list[dict[str, Any]]:
    """The batch's calibration runs as Ray tasks with a trial's resources; a run that failed comes back as a
    "failed" record with its error's last line."""
    import ray

    task = worker_task(calibrate, spec)
    refs = [task.remote(s.unit, params, rng.low, rng.high, spec.calibration, context, prepared)
            for s, rng, params in batch]
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except Exception as err:  # noqa: BLE001 - a failed calibration leaves its unit's range as declared
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            out.append({"status": FAILED, "reason": (lines[-1] if lines else type(err).__name__)[:300]})
    return out
