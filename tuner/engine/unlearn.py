"""One unlearning run (a trial): unlearn a model with one method at one setting, then measure it.

The run evaluates as it goes and, by default, stops once the forget gap reaches 0 (the approximate-retraining
point, guideline 1) and hands back the evaluated checkpoint closest to that point. Given the target's tolerances
it also stops early when the band is out of reach or utility collapsed (`tuner.engine.stopping`). Batch size, accumulation,
world size and device are recorded with every result, so numbers can be compared honestly.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from tuner.core.errors import TunerError
from tuner.core.hparams import EPOCHS, LR, RETAIN_WEIGHT
from tuner.core.precision import PrecisionPlan, resolve_precision
from tuner.core.settings import RunSettings
from tuner.core.status import COMPLETED, DIVERGED, STOPPED_AT_TARGET, RunStatus
from tuner.engine import methods
from tuner.engine.data import RetainSource, UnlearnData
from tuner.engine.distributed import (
    Ranks,
    StepSync,
    Strategy,
    backend,
    reshard,
    restore_weights,
    shard_model,
    snapshot_weights,
)
from tuner.engine.evaluation import Screening, autocast_for, full_metrics, original_metrics
from tuner.engine.lossfn import compile_decoder
from tuner.engine.memory import GIB, ModelShape, RunPlan, device_capacity, measured_peak, resolve_eval_batch
from tuner.engine.methods.base import Batch, MethodContext
from tuner.engine.stopping import CONFIRM_SE, StopRules, is_estimate, reached
from tuner.engine.training import IndexStream, make_optimizer, optimizer_name, run_loop
from tuner.engine.verbmem import VerbMemPlan


class UnlearnConfig(RunSettings):
    """Everything that defines one run; also the format of an exported recommendation's `config`.

    `params` holds the method's hyperparameters (`UnlearningMethod.space()`), defaults filled in; the flat
    keys of older exports (`lr: ...` beside `method:`) are read into it."""

    method: str = Field(description="one of `tuner methods`")
    params: dict[str, float | int] = Field(default_factory=dict, description="the method's hyperparameters")
    max_steps: int | None = Field(None, gt=0, description="optimiser steps; overrides epochs when given")
    end_step: int | None = Field(
        None, gt=0, description="end the run after this step while the lr schedule still spans the planned steps: "
                                "reproduces a trial's checkpoint at that step (an exported candidate); the "
                                "hopeless and collapse stops do not apply")
    gap_tolerance: float | None = Field(
        None, gt=0, description="the target band |forget gap| <= this (a study passes its target's): prune_hopeless "
                                "stops a trial that cannot reach it; unset: no such stop")
    utility_tolerance: float | None = Field(
        None, gt=0, description="the acceptable utility drop (a study passes its target's): stop_on_collapse stops "
                                "a trial past it twice in a row; unset: no such stop")
    retain_source: RetainSource = Field("in_distribution", description="retain data of methods that train on it")
    seed: int = Field(0, description="seeds the batch order and every random draw of the method")
    world_size: int = Field(1, ge=1, description="ranks the run is sharded over; batch_size is per rank")
    sharding: Strategy = Field("ddp", description="ddp: weights on every rank; fsdp: FSDP2 shards them")

    @model_validator(mode="before")
    @classmethod
    def _flat_params(cls, data: Any) -> Any:
        """Older exports wrote each hyperparameter beside `method`: they move into `params` (where a knob the
        method does not take is refused), except λ, which they wrote for every method as a placeholder."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            return data
        names = methods.declared()
        flat = [k for k in data if k in names]
        if not flat:
            return data
        own = set(methods.get(data["method"]).hyperparameters()) if data["method"] in methods.available() else set()
        params = dict(data.get("params") or {})
        rest = {k: v for k, v in data.items() if k not in names}
        params.update({k: data[k] for k in flat if (k in own or k != RETAIN_WEIGHT.name) and k not in params})
        return {**rest, "params": params}

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        names = methods.available()
        if value not in names:
            raise ValueError(f"unknown method '{value}' (choose from: {', '.join(names)})")
        return value

    @field_validator("params")
    @classmethod
    def _complete_params(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        method = info.data.get("method")  # absent when the method itself was refused
        return methods.get(method).settings(value) if method else value

    @property
    def lr(self) -> float:
        return float(self.params[LR.name])

    @property
    def epochs(self) -> float:
        return float(self.params[EPOCHS.name])

    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def stop_rules(self, horizon: int) -> StopRules:
        """The run's early stops (`tuner.engine.stopping`); a run that reproduces a checkpoint (`end_step`) runs
        to it."""
        search = self.end_step is None
        return StopRules(horizon, self.gap_tolerance if self.prune_hopeless and search else None,
                         self.utility_tolerance if self.stop_on_collapse and search else None)

    def total_steps(self, n_forget: int) -> int:
        """An epoch is one pass over the forget set; retain-only methods take as many steps for the same
        epochs, so `epochs` means the same budget for every method."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * n_forget / self.effective_batch()))


@dataclass
class UnlearnResult:
    status: RunStatus
    planned_steps: int
    steps_done: int
    selected_step: int
    stop_step: int | None
    diverged_step: int | None
    reason: str | None
    metrics: dict[str, float] | None
    baseline: dict[str, float]
    curve: list[dict[str, float]]
    train_tokens: int
    eval_tokens: int
    wall_time_s: float
    train_time_s: float
    eval_time_s: float  # the run's own evaluations: curve points and the kept checkpoint's full scoring
    environment: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # the sets the curve points scored on a subsample: {set: [blocks scored, blocks in the set]}
    subsampled: dict[str, list[int]] = field(default_factory=dict)
    baseline_time_s: float = 0.0  # scoring the original model, when the run was not given its metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TunerError(f"device '{name}' requested but no CUDA device is available (use device: cpu or auto)")
    return device


def describe_environment(device: torch.device, precision: PrecisionPlan, cfg: UnlearnConfig,
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": str(device), "device_name": name, "world_size": cfg.world_size,
        "sharding": cfg.sharding if cfg.world_size > 1 else "none", "backend": backend(),
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "effective_batch": cfg.effective_batch(),
        "precision": precision.name, "weights_dtype": _dtype_name(precision.weights),
        "compute_dtype": _dtype_name(precision.compute), "optimizer": optimizer_name(optimizer),
        "lora": cfg.lora.model_dump() if cfg.lora is not None else None,
        "gradient_checkpointing": cfg.gradient_checkpointing, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def trainable_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the trainable parameters to `dtype` (the precision's master weights), whatever the checkpoint's
    storage dtype; frozen ones (a LoRA base) stay as they are."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def memory_record(model: torch.nn.Module, cfg: UnlearnConfig, method_cls, precision: PrecisionPlan,
                  block_size: int, device: torch.device) -> dict[str, Any]:
    """The memory plan of this run next to the measured peak, stored with every result."""
    shape = ModelShape.from_config(model.config, loras=[cfg.lora] if cfg.lora is not None else None)
    shards = cfg.world_size if cfg.sharding == "fsdp" else 1
    planned = RunPlan.assemble(shape, [method_cls], cfg, precision.name, block_size, device_capacity(device),
                               shards=shards, ranks=cfg.world_size, gpu=device.type == "cuda").plan
    peak = measured_peak(device)
    return {"plan_gib": planned.gib(), "peak_gib": round(peak / GIB, 3) if peak is not None else None,
            # above 1: the plan under-estimated this run (the allocator's peak, without the CUDA context)
            "peak_vs_plan": round(peak / (planned.total - planned.parts["cuda runtime"]), 3) if peak else None,
            "capacity_gib": round(planned.capacity / GIB, 3) if planned.capacity else None}


def verbmem_plan(settings: RunSettings, decode: Callable[[list[int]], str] | None,
                 seed: int = 0) -> VerbMemPlan | None:
    """The VerbMem scoring `settings` ask for (None: off); it decodes with the tokenizer's `decode`."""
    if settings.verbmem_blocks is None:
        return None
    if decode is None:
        raise TunerError("run.verbmem_blocks: this run was given no tokenizer to decode its continuations with")
    return VerbMemPlan(settings.verbmem_blocks, settings.verbmem_prefix, settings.verbmem_tokens, seed, decode)


def run_unlearning(
    model: torch.nn.Module,
    data: UnlearnData,
    cfg: UnlearnConfig,
    reference: torch.nn.Module | None = None,
    baseline: dict[str, float] | None = None,
    on_progress: Callable[[int, int, dict[str, float]], None] | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[int, dict[str, float]], None] | None = None,
    lr_at: Callable[[int], float] | None = None,
    original: dict[str, torch.Tensor] | None = None,
    leak_reference: float | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> UnlearnResult:
    """Unlearn `model` in place. `reference` is the frozen original (needed by ga_kl and adversarial);
    `baseline` is the original model's metrics and `original` its per-block NLL on forget and unseen (the
    reference MIA's yardstick), both computed here when `baseline` is not given (a study computes them once);
    `leak_reference` is the AUC privleak is relative to (the exact retrain's; None: the approximate target);
    `decode` (the tokenizer's) turns tokens into text for `cfg.verbmem_blocks`.
    `on_start` gets the planned steps and the step-0 curve point (what the later points' utility drops are
    taken against) before the first step; `on_eval` gets every later curve point. `lr_at` replaces the lr
    schedule (`training.run_loop`)."""
    started = time.perf_counter()
    method_cls = methods.get(cfg.method)
    method = method_cls()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dtype = precision.compute
    retain = data.retain_for(cfg.retain_source) if method_cls.uses_retain else None
    if method_cls.needs_reference and reference is None:
        raise ValueError(f"method '{cfg.method}' needs the frozen original model as `reference`")
    ranks = Ranks.current()
    if ranks.world != cfg.world_size:
        raise TunerError(f"world_size {cfg.world_size} but this process is one of {ranks.world} ranks; for one "
                         f"process use world_size 1 and batch_size {cfg.batch_size * cfg.world_size}: the same "
                         "effective batch gives the same result")
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    trainable_in(model, precision.weights)
    if reference is not None:
        reference.to(device).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        # non-reentrant: works when the inputs of a layer need no gradient (a frozen LoRA base)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_decoder(model, data.forget[:1].to(device))
    # the module the loss calls (the model, or a method's wrapper around it); `model` stays what is evaluated
    # and checkpointed
    forward_module = method.training_module(model)
    wrapper = forward_module if forward_module is not model else None
    train_model = (shard_model(model, cfg.sharding, device, wrapper, method_cls.partial_forward)
                   if ranks.world > 1 else forward_module)
    synced = model if cfg.sharding == "fsdp" else train_model  # FSDP2 shards the model itself
    if (reference is not None and ranks.world > 1 and cfg.sharding == "fsdp"
            and next(reference.parameters(), None) is not None):
        # frozen, sharded like the model (forward only); a LoRA reference (the model with its adapters off)
        # holds no weights of its own: it runs the sharded model
        shard_model(reference, "fsdp", device)
    eval_tokens = 0
    eval_batch = resolve_eval_batch(cfg, model.config, [method_cls], precision.name, data.block_size)

    def evaluated_tokens() -> int:
        return sum(int(b.numel()) for b in data.eval_sets().values())

    eval_time = 0.0
    t0 = time.perf_counter()
    verbmem = verbmem_plan(cfg, decode)
    if baseline is None:  # the original model's metrics: a study scores them once for all its trials
        baseline, original = original_metrics(model, data, eval_batch, device, dtype, leak_reference, cfg.mink_k,
                                              verbmem)
    baseline_time = time.perf_counter() - t0

    with autocast_for(device, dtype):  # what a method precomputes is computed as its loss will be
        method.prepare(MethodContext(model=model, reference=reference, forget=data.forget, device=device,
                                     dtype=dtype, seed=cfg.seed, params=cfg.params,
                                     eval_batch_size=eval_batch))
    # the settings the run used, a depth-relative default resolved for this model (recorded with the result)
    cfg = cfg.model_copy(update={"params": dict(method.ctx.params)})
    total_steps = cfg.total_steps(data.forget.shape[0])
    eval_every = cfg.eval_every or max(1, total_steps // 10)
    forget_stream = IndexStream(data.forget.shape[0], cfg.seed)
    retain_stream = IndexStream(retain.shape[0], cfg.seed + 1) if retain is not None else None
    tokens_per_micro = cfg.batch_size * data.block_size * (int(method_cls.uses_forget) + int(retain is not None))
    global_micro = cfg.batch_size * ranks.world  # one global draw per micro-step; this rank trains on its slice

    def micro_loss(step: int, micro: int):
        rows = ranks.local_rows(forget_stream.take(global_micro)) if method_cls.uses_forget else None
        batch = Batch(
            forget=data.forget[rows].to(device, non_blocking=True) if rows is not None else None,
            forget_rows=rows,
            retain=retain[ranks.local_rows(retain_stream.take(global_micro))].to(device, non_blocking=True)
            if retain_stream is not None else None,
        )
        return method.loss(train_model, batch)

    start_point = {k: baseline[k] for k in ("forget_nll", "unseen_nll", "retain_nll", "general_nll", "forget_gap")
                   if k in baseline}
    screening = Screening(data, cfg.eval_gap_blocks, cfg.eval_utility_blocks, cfg.seed, eval_batch, device, dtype)
    t = time.perf_counter()
    eval_tokens += screening.start(model, baseline)
    eval_time += time.perf_counter() - t
    curve: list[dict[str, float]] = [{"step": 0, **start_point}]
    if on_start is not None:
        on_start(total_steps, curve[0])
    state = {"best_gap": math.inf, "best_step": 0, "best_weights": None, "stop_step": None,
             "eval_diverged": None, "early": None}
    rules = cfg.stop_rules(total_steps)

    def after_step(step: int, logs: dict[str, float]) -> bool:
        nonlocal eval_time, eval_tokens
        if on_progress is not None:
            on_progress(step, total_steps, logs)
        if step % eval_every and step not in (total_steps, cfg.end_step):
            return False
        n_point = len(curve)  # 1 for the first point after step 0
        with_utility = n_point % cfg.eval_utility_every == 0 or step == total_steps
        t = time.perf_counter()
        point, tokens = screening.point(model, with_utility)
        entry = {"step": step, "loss": logs["loss"], **point}
        early = rules.check([*curve, entry])
        if is_estimate(point) and all(math.isfinite(v) for v in point.values()) \
                and (cfg.stop_at_target and reached(entry, CONFIRM_SE) or early):
            # a stop rests on whole-set figures: an estimate that would end the run is scored again in full
            point, more = screening.point(model, with_utility, whole=True)
            tokens += more
            entry = {"step": step, "loss": logs["loss"], **point}
            early = rules.check([*curve, entry])
        eval_time += time.perf_counter() - t
        eval_tokens += tokens
        curve.append(entry)
        if on_eval is not None:
            on_eval(curve[-1])
        if not all(math.isfinite(v) for v in point.values()):
            state["eval_diverged"] = step
            return True
        if cfg.checkpoint == "best" and abs(point["forget_gap"]) < state["best_gap"]:
            state["best_gap"], state["best_step"] = abs(point["forget_gap"]), step
            state["best_weights"] = snapshot_weights(model)
        if cfg.stop_at_target and reached(entry):
            state["stop_step"] = step
            return True
        state["early"] = early
        return state["early"] is not None or (cfg.end_step is not None and step >= cfg.end_step)

    sync = StepSync(synced, ranks) if ranks.world > 1 else None
    # after sharding, and with the shards registered again after the forward passes above: FSDP2 replaces the
    # parameters with sharded ones
    reshard(model)
    optim = cfg.optim(cfg.lr)
    optimizer = make_optimizer([p for p in train_model.parameters() if p.requires_grad], optim, device)
    outcome = run_loop(train_model, micro_loss, total_steps, cfg.grad_accum, optim, device, dtype, after_step,
                       optimizer=optimizer, sync=sync, lr_at=lr_at)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()

    diverged_step = outcome.diverged_at or state["eval_diverged"]
    early = state["early"]
    reason = outcome.reason or (f"non-finite evaluation NLL at step {diverged_step}" if diverged_step
                                else early.reason if early is not None else None)
    metrics = None
    selected = outcome.steps_done
    if diverged_step is None:
        if cfg.checkpoint == "best" and state["best_weights"] is not None and state["best_step"] != selected:
            restore_weights(model, state["best_weights"])
            selected = state["best_step"]
        t = time.perf_counter()
        metrics = full_metrics(model, data, eval_batch, device, dtype, baseline, original=original,
                               leak_reference=leak_reference, mink_k=cfg.mink_k, verbmem=verbmem)
        eval_time += time.perf_counter() - t
        eval_tokens += evaluated_tokens()
    status: RunStatus = (DIVERGED if diverged_step is not None
                         else STOPPED_AT_TARGET if state["stop_step"] is not None
                         else early.status if early is not None else COMPLETED)
    wall = time.perf_counter() - started
    return UnlearnResult(
        status=status, planned_steps=total_steps, steps_done=outcome.steps_done, selected_step=selected,
        stop_step=state["stop_step"], diverged_step=diverged_step, reason=reason, metrics=metrics,
        baseline=baseline, curve=curve,
        train_tokens=outcome.steps_done * cfg.grad_accum * tokens_per_micro * ranks.world,
        eval_tokens=eval_tokens, wall_time_s=wall, train_time_s=max(0.0, wall - eval_time - baseline_time),
        eval_time_s=eval_time, baseline_time_s=baseline_time,
        environment={**describe_environment(device, precision, cfg, optimizer), "eval_batch_size": eval_batch,
                     "memory": memory_record(model, cfg, method_cls, precision, data.block_size, device)},
        config=cfg.model_dump(), subsampled=screening.describe(),
    )
