"""Robustness checks of an unlearned model: does the forgetting survive a relearning attack, weight
quantization, and a change of seed?

A forget gap of 0 (forget NLL = unseen NLL) says the model *scores* the forget text like text it never saw. It
does not say the knowledge is gone: approximate unlearning often only suppresses it, and two cheap operations
bring it back.

- Relearning (Hu et al., "Jogging the memory of unlearned LLMs via benign relearning", arXiv 2406.13356): a
  few fine-tuning steps on a *part* of the forget set (or on related retain text) recover the *rest* of it. The
  attack here trains on one seeded half of the forget blocks and measures the other half, so what it reports is
  recovery of text the attack never showed the model, not memorisation of the attack text. Its speed is compared
  with the exact-retrain model's on the same attack (`relearn_speed_ratio`): a model that truly never learned the
  forget text can only learn it from scratch, so a candidate that relearns much faster still holds it.
- Quantization (Zhang et al., "Catastrophic failure of LLM unlearning via quantization", ICLR 2025): unlearning
  moves weights by less than a 4-bit quantization step, so rounding the unlearned weights can land them back
  near the original's. `quantized_metrics` rounds a copy's weights to 4 and 8 bits (round-to-nearest, weight
  only, per group, torchao's `IntxWeightOnlyConfig`) and scores it.
- Seed spread (`seed_spread`): the same configuration re-run with other seeds; a recommendation whose forget gap
  moves more across seeds than between configurations is not a finding.

Every check works on a copy: the candidate passed in is never changed.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tuner.core.errors import TunerError
from tuner.core.settings import AttackSource, QuantSettings, RelearnSettings
from tuner.engine.data import UnlearnData
from tuner.engine.evaluation import curve_point
from tuner.engine.methods.base import nll_term
from tuner.engine.training import IndexStream, LossOut, OptimConfig, make_optimizer, run_loop, torchao_module

RELEARN = RelearnSettings()
QUANT = QuantSettings()


# ---- relearning -------------------------------------------------------------------------------------------

def forget_split(n_blocks: int, attack_fraction: float = RELEARN.attack_fraction,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(attack rows, evaluation rows) of the forget set: a fixed seeded split, each sorted.

    Disjoint on purpose: evaluating on the blocks the attack trains on would measure how fast any model
    memorises text it is shown (the exact-retrain model included), not whether the unlearned text comes back.
    The same `seed` gives the same split to a candidate and to the retrain model, so their drops compare."""
    if n_blocks < 2:
        raise TunerError(f"the relearning attack needs at least 2 forget blocks (one to attack, one to measure); "
                         f"the forget set has {n_blocks}")
    n_attack = min(n_blocks - 1, max(1, round(n_blocks * attack_fraction)))
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[:n_attack].sort().values, perm[n_attack:].sort().values


def attack_sets(data: UnlearnData, source: AttackSource, attack_fraction: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attack blocks, forget evaluation blocks). The evaluation slice is the same for both sources, so a
    forget-text attack and a retain-text attack report comparable numbers; it is capped at the study's own
    forget evaluation size (`data.forget_eval`), so the check never scores more than a curve point does."""
    attack_rows, eval_rows = forget_split(data.forget.shape[0], attack_fraction, seed)
    cap = data.forget_eval.shape[0] if data.forget_eval is not None else eval_rows.numel()
    if eval_rows.numel() > cap:
        keep = torch.randperm(eval_rows.numel(), generator=torch.Generator().manual_seed(seed))[:cap]
        eval_rows = eval_rows[keep.sort().values]
    if source == "forget":
        attack = data.forget[attack_rows]
    elif source == "retain":
        kind = "in_distribution" if "in_distribution" in data.retain_train else "general"
        attack = data.retain_for(kind)
    else:
        raise TunerError(f"unknown relearning source '{source}' (choose from: forget, retain)")
    return attack, data.forget[eval_rows]


def attack_copy(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A trainable copy of the candidate on `device`, every weight trainable (the attacker fine-tunes the whole
    released model, not just an unlearning run's adapters). The candidate itself is not touched."""
    attacked = copy.deepcopy(model)
    merge = getattr(attacked, "merge_and_unload", None)
    if callable(merge):  # a peft model: its adapters are part of the released weights
        attacked = merge()
    return attacked.to(device).train().requires_grad_(True)


def _trainable(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model itself, every weight trainable. A peft model's base is shared with the run's frozen original
    (`Workbench.adapted`): merging its adapters in place would change the original, so it is copied instead."""
    if callable(getattr(model, "merge_and_unload", None)):
        return attack_copy(model, device)
    return model.to(device).train().requires_grad_(True)


def default_eval_every(steps: int) -> int:
    return max(1, steps // 5)


def relearn(
    model: torch.nn.Module,
    data: UnlearnData,
    steps: int = RELEARN.steps,
    lr: float = RELEARN.lr,
    batch_size: int = RELEARN.batch_size,
    source: AttackSource = RELEARN.source,
    attack_fraction: float = RELEARN.attack_fraction,
    eval_every: int | None = RELEARN.eval_every,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    eval_batch_size: int = 16,
    in_place: bool = False,
) -> dict:
    """Fine-tune a copy of `model` (or, `in_place`, the model itself: no second copy on the GPU, for a caller
    done with it) with plain NLL for `steps` steps on attack text and follow the forget gap
    on the held-out forget slice. `dtype` is the compute (autocast) dtype, as in a run.

    Returns `curve` (points `{step, forget_nll, unseen_nll, forget_gap}`, step 0 before the attack),
    `relearn_gap_before` / `relearn_gap` (forget gap on the evaluation slice before / after: forget NLL minus
    unseen NLL, the study's definition), `relearn_drop` (forget NLL before minus after: > 0 means the attack
    brought the forget text back), `relearn_unseen_drop` (the same for unseen text: what the attack teaches
    about the domain in general), `diverged` and the attack's settings and sizes."""
    device = torch.device(device)
    attack, held = attack_sets(data, source, attack_fraction, seed)
    sets = {"forget": held, "unseen": data.unseen}
    attacked = attack_copy(model, device) if not in_place else _trainable(model, device)
    every = eval_every or default_eval_every(steps)
    curve = [{"step": 0, **curve_point(attacked, sets, eval_batch_size, device, dtype)}]
    stream = IndexStream(attack.shape[0], seed + 3)
    torch.manual_seed(seed)

    def micro_loss(step: int, micro: int) -> LossOut:
        return LossOut(nll_term(attacked, attack[stream.take(batch_size)].to(device, non_blocking=True)))

    def after_step(step: int, logs: dict[str, float]) -> bool:
        if step % every == 0 or step == steps:
            curve.append({"step": step, "loss": logs["loss"],
                          **curve_point(attacked, sets, eval_batch_size, device, dtype)})
        return False

    # an attacker's plain fine-tune: constant lr (no warmup or decay, so the drop after k steps does not depend
    # on the planned length), no weight decay, the project's clipping and AdamW
    optim = OptimConfig(lr=lr, warmup_ratio=0.0, schedule="constant")
    optimizer = make_optimizer([p for p in attacked.parameters() if p.requires_grad], optim, device)
    outcome = run_loop(attacked, micro_loss, steps, 1, optim, device, dtype, after_step, optimizer=optimizer)
    first, last = curve[0], curve[-1]
    diverged = outcome.diverged_at is not None or not all(math.isfinite(v) for v in last.values())
    return {
        "source": source, "steps": steps, "steps_done": outcome.steps_done, "attack_lr": lr, "batch_size": batch_size,
        "attack_blocks": int(attack.shape[0]), "eval_blocks": int(held.shape[0]), "seed": seed,
        "curve": curve, "diverged": diverged,
        "relearn_gap_before": first["forget_gap"], "relearn_gap": last["forget_gap"],
        "relearn_drop": first["forget_nll"] - last["forget_nll"],
        "relearn_unseen_drop": first["unseen_nll"] - last["unseen_nll"],
    }


def relearn_speed_ratio(candidate_drop: float, retrain_drop: float) -> float:
    """How much faster the candidate relearns the forget text than the exact-retrain model under the same attack:
    `candidate_drop / retrain_drop` (about 1: relearns like a model that never saw it; well above 1: the text
    was suppressed, not removed). `retrain_drop` is the retrain model's `relearn_drop`, computed once per study.

    NaN when the retrain model's drop is not positive (the attack taught it nothing, so there is no reference
    speed: strengthen the attack) or either drop is not finite."""
    if not (math.isfinite(candidate_drop) and math.isfinite(retrain_drop)) or retrain_drop <= 0:
        return math.nan
    return candidate_drop / retrain_drop


def load_exact_retrain(retrain_path: Path | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The testbed's exact-retrain model (`bench.source.retrain_path`), loaded as `tuner.study.trial.prepare` loads it,
    frozen: the reference whose relearning speed a candidate is compared with."""
    from tuner.engine.models import load, resolve

    retrain, _ = load(resolve(str(retrain_path)), torch_dtype=dtype)
    return retrain.eval().requires_grad_(False)


# ---- quantization -----------------------------------------------------------------------------------------

def _torchao_quantization():
    return torchao_module("quantization", "quantization checks")


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-2-style `Conv1D` layers (weight `[in, out]`) replaced in place by the equivalent `nn.Linear`, so that
    quantization, which handles `nn.Linear`, reaches them as it reaches any other architecture's projections."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            n_in, n_out = child.weight.shape
            linear = torch.nn.Linear(n_in, n_out, bias=child.bias is not None, device=child.weight.device,
                                     dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(model, name, linear)
        else:
            conv1d_as_linear(child)
    return model


def quantize_weights(model: torch.nn.Module, bits: int, group_size: int = QUANT.group_size,
                     symmetric: bool = QUANT.symmetric, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, int]:
    """(quantized copy, number of layers quantized): every linear layer of the decoder rounded to `bits`-bit
    integers with one scale per `group_size` input features (per output row where the row is not a multiple
    of `group_size`), in `dtype` (the compute dtype a deployment would quantize; None: as the model is).

    The output head (and the embedding it may be tied to) stays in full precision, as GPTQ and AWQ leave it.
    torchao's `IntxWeightOnlyConfig` (int4 stored unpacked in int8, dequantized in the matmul) runs on CPU for
    fp32 and bf16 models and needs no GPU kernel; `Int4WeightOnlyConfig` (torchao 0.18) fails on CPU ("Requires
    mslk", its GPU kernel library), so it is not used."""
    if not 1 <= bits <= 8:
        raise TunerError(f"quantization to {bits} bits: choose 1 to 8")
    q = _torchao_quantization()
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    quantized = copy.deepcopy(model)
    merge = getattr(quantized, "merge_and_unload", None)
    if callable(merge):
        quantized = merge()
    quantized = conv1d_as_linear(quantized.eval().requires_grad_(False))
    if dtype is not None:
        quantized = quantized.to(dtype)
    head = quantized.get_output_embeddings()
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    weight_dtype = getattr(torch, f"int{bits}")
    count = 0
    for grouped in (True, False):
        def chosen(module: torch.nn.Module, fqn: str, grouped: bool = grouped) -> bool:
            return (isinstance(module, torch.nn.Linear) and module is not head
                    and (module.in_features % group_size == 0) == grouped)

        count += sum(1 for name, m in quantized.named_modules() if chosen(m, name))
        granularity = PerGroup(group_size) if grouped else PerAxis(0)
        config = q.IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity, mapping_type=mapping)
        q.quantize_(quantized, config, filter_fn=chosen)
    return quantized, count


def quantized_metrics(
    model: torch.nn.Module,
    data: UnlearnData,
    bits: Iterable[int] = QUANT.bits,
    baseline: Mapping[str, float] | None = None,
    unquantized: Mapping[str, float] | None = None,
    group_size: int = QUANT.group_size,
    symmetric: bool = QUANT.symmetric,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    eval_batch_size: int = 16,
) -> dict[str, float]:
    """The forget gap and utility of `model` after weight quantization to each of `bits`, on the study's
    evaluation sets (so `quant4_gap` reads like the study's `forget_gap`).

    Per bit width b: `quant{b}_gap`, `quant{b}_{forget,unseen,retain,general}_nll`, `quant{b}_layers`; with the
    original model's metrics as `baseline`: `quant{b}_utility_drop` (retain NLL minus the original's, as the
    study's `utility_drop`; general NLL where there is no retain set) and `quant{b}_general_utility_drop`; with
    the candidate's own unquantized metrics as `unquantized` (a trial's final metrics): `quant{b}_gap_shift`
    (quantized minus unquantized gap: > 0 toward remembering less, < 0 the forgetting undone)."""
    device = torch.device(device)
    sets = data.eval_sets()
    out: dict[str, float] = {}
    for b in bits:
        quantized, layers = quantize_weights(model, b, group_size, symmetric, dtype)
        point = curve_point(quantized.to(device), sets, eval_batch_size, device, dtype)
        del quantized
        out[f"quant{b}_layers"] = layers
        out[f"quant{b}_gap"] = point["forget_gap"]
        out.update({f"quant{b}_{k}": v for k, v in point.items() if k.endswith("_nll")})
        if baseline is not None:
            for name, key in (("retain", "utility_drop"), ("general", "general_utility_drop")):
                if f"{name}_nll" in point and f"{name}_nll" in baseline:
                    out[f"quant{b}_{key}"] = point[f"{name}_nll"] - baseline[f"{name}_nll"]
            if f"quant{b}_utility_drop" not in out and f"quant{b}_general_utility_drop" in out:
                out[f"quant{b}_utility_drop"] = out[f"quant{b}_general_utility_drop"]
        if unquantized is not None and "forget_gap" in unquantized:
            out[f"quant{b}_gap_shift"] = point["forget_gap"] - unquantized["forget_gap"]
    return out


# ---- seeds ------------------------------------------------------------------------------------------------

def seed_spread(runs: Iterable[Mapping[str, float] | None],
                keys: tuple[str, ...] = ("forget_gap", "utility_drop")) -> dict[str, float]:
    """Mean, sample standard deviation and spread (max - min) of each of `keys` over re-runs of one configuration
    with different seeds: `{key}_mean`, `{key}_std`, `{key}_spread`, and `n` / `n_failed`. A run without metrics
    (None: diverged) or with a non-finite value counts as failed and is left out of the figures; std is NaN
    with fewer than two runs (one run says nothing about the spread)."""
    runs = list(runs)
    ok = [r for r in runs if r is not None and all(k in r and math.isfinite(r[k]) for k in keys)]
    out: dict[str, float] = {"n": len(ok), "n_failed": len(runs) - len(ok)}
    for key in keys:
        values = [float(r[key]) for r in ok]
        out[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        out[f"{key}_spread"] = max(values) - min(values) if values else math.nan
    return out


# ---- a candidate's checks, as a study runs them --------------------------------------------------------------

def retrain_relearning(retrain: torch.nn.Module, data: UnlearnData, settings: RelearnSettings, seed: int,
                       device: torch.device, dtype: torch.dtype, eval_batch_size: int) -> dict[str, Any]:
    """The exact-retrain model under the study's attack, once per study: how fast a model that never learned
    the forget set picks it up (the yardstick of every candidate's `relearn_speed_ratio`)."""
    started = time.perf_counter()
    result = relearn(retrain, data, **settings.model_dump(), seed=seed, device=device, dtype=dtype,
                     eval_batch_size=eval_batch_size, in_place=True)
    return {**{k: result[k] for k in ("relearn_gap_before", "relearn_gap", "relearn_drop", "curve", "steps",
                                      "diverged")}, "time_s": time.perf_counter() - started}


def check_candidate(model: torch.nn.Module, data: UnlearnData, checks: list[str], relearn_settings: RelearnSettings,
                    quant_settings: QuantSettings, retrain: Mapping[str, Any] | None,
                    baseline: Mapping[str, float] | None, metrics: Mapping[str, float] | None, seed: int,
                    device: torch.device, dtype: torch.dtype, eval_batch_size: int) -> dict[str, Any]:
    """The study's robustness checks of one candidate, the model at its checkpoint: `{"metrics":
    {relearn_gap, relearn_drop, relearn_speed_ratio, quant4_gap, ...}, "details": {the attack's curve},
    "time_s"}`, as `Store.add_check` stores them.

    The caller is done with `model`: quantization (on copies) runs first, then the attack fine-tunes the model
    itself, so a GPU never holds a second full-precision copy. A check that runs out of memory is recorded as
    such; the trial's own result stands."""
    started = time.perf_counter()
    out: dict[str, float] = {}
    details: dict[str, Any] = {}
    try:
        if "quantization" in checks:
            quant = quantized_metrics(model, data, quant_settings.bits, baseline, metrics, quant_settings.group_size,
                                      quant_settings.symmetric, device, dtype, eval_batch_size)
            out.update({k: v for k, v in quant.items() if k.endswith(("_gap", "_utility_drop", "_gap_shift"))})
        if "relearn" in checks:
            r = relearn(model, data, **relearn_settings.model_dump(), seed=seed, device=device, dtype=dtype,
                        eval_batch_size=eval_batch_size, in_place=True)
            out.update({k: r[k] for k in ("relearn_gap_before", "relearn_gap", "relearn_drop")})
            if retrain and retrain.get("relearn_drop") is not None:
                out["relearn_speed_ratio"] = relearn_speed_ratio(r["relearn_drop"], retrain["relearn_drop"])
            details["relearn_curve"] = r["curve"]
    except (torch.OutOfMemoryError, MemoryError) as err:
        details["error"] = f"out of memory during the robustness checks: {str(err).splitlines()[0][:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"metrics": out, "details": details, "time_s": time.perf_counter() - started}
