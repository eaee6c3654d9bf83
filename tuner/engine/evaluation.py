"""How an unlearned model is measured: NLL per set, forget gap, utility drop, membership inference.

All scoring is batched under `torch.inference_mode` (`torch.no_grad` for an FSDP2-sharded model); per-token
work stays inside tensor ops. A set's blocks go to the device once, per-token NLL is computed through the output
head a chunk of tokens at a time (`tuner.engine.lossfn`: no fp32 copy of a batch's full logits) and stays on the
device until the set is done, so the host waits for the accelerator once per set, not once per batch.
"""

from __future__ import annotations

import contextlib
import math

import torch

from tuner.core.settings import MINK_K
from tuner.engine.data import UnlearnData
from tuner.engine.distributed import eval_share, gather_rows, scoring_mode
from tuner.engine.lossfn import next_token_logits as next_token_logits  # re-exported for the methods' full-logit terms
from tuner.engine.lossfn import next_token_nll, next_token_stats
from tuner.engine.verbmem import VerbMemPlan, verbatim_memorisation

APPROXIMATE_AUC = 0.5  # privleak's reference without an exact retrain: forget indistinguishable from unseen


def autocast_for(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on accelerators; a no-op context in fp32 so CPU runs stay exact."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def token_nll(model, blocks: torch.Tensor, batch_size: int, device: torch.device,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token NLL `[n_blocks, block_size - 1]` (float32, on CPU), one device-to-host transfer.

    In a run sharded over ranks (`tuner.engine.distributed`), each rank scores its contiguous share of the blocks and
    the shares are gathered, so every rank returns the NLL of all blocks, in order."""
    return _score_blocks(model, blocks, batch_size, device, dtype, next_token_nll)


def token_stats(model, blocks: torch.Tensor, batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token `[n_blocks, block_size - 1, 3]` (float32, on CPU): NLL, argmax hit and MinK++ z
    (`tuner.engine.lossfn.logit_stats`), from the same forward pass as `token_nll`."""
    return _score_blocks(model, blocks, batch_size, device, dtype, next_token_stats)


def _score_blocks(model, blocks: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype,
                  per_batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    share = eval_share(blocks)
    on_device = share.to(device)  # one copy: a pageable host-to-device copy per batch would sync each time
    pieces = []
    with scoring_mode(model):
        for start in range(0, share.shape[0], batch_size):
            with autocast_for(device, dtype):
                pieces.append(per_batch(model, on_device[start:start + batch_size]))
    model.train(was_training)
    out = torch.cat(pieces) if pieces else torch.empty(0, share.shape[1] - 1, dtype=torch.float32, device=device)
    return gather_rows(out, blocks.shape[0]).cpu()


def auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(score(member) > score(non-member)), ties counting half: 0.5 means indistinguishable."""
    if members.numel() == 0 or nonmembers.numel() == 0:
        return float("nan")
    diff = members.double()[:, None] - nonmembers.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def bottom_k_mean(values: torch.Tensor, k: float) -> torch.Tensor:
    """Per row of `[n, T]`: the mean of its floor(k * T) smallest values (at least one), as open-unlearning
    counts them."""
    count = max(1, int(values.shape[1] * k))
    return values.topk(count, dim=1, largest=False).values.mean(dim=1)


def mia_scores(nll: torch.Tensor, zlib_len: torch.Tensor | None, k: float = MINK_K,
               z: torch.Tensor | None = None, original: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Membership scores per block, higher = more likely seen in training. `z`: MinK++'s standardised
    per-token log-probs (`tuner.engine.lossfn.logit_stats`); `original`: the original model's mean NLL of
    each block, for the reference attack (how much more likely the block is now than under the original)."""
    scores = {
        "loss": -nll.mean(dim=1),
        "mink": bottom_k_mean(-nll, k),  # Min-K% Prob: mean log-prob of the k least likely tokens
    }
    if zlib_len is not None:
        scores["zlib"] = -nll.sum(dim=1) / zlib_len.clamp(min=1.0)
    if z is not None:
        scores["minkpp"] = bottom_k_mean(z, k)
    if original is not None:
        scores["ref"] = original - nll.mean(dim=1)
    return scores


def exact_memorisation(hits: torch.Tensor) -> torch.Tensor:
    """Per block of `[n, T]` argmax hits: the share of tokens whose teacher-forced argmax is the true token."""
    return hits.float().mean(dim=1)


def extraction_strength(hits: torch.Tensor) -> torch.Tensor:
    """Per block: 1 - k/T for the smallest k after which every teacher-forced argmax is the true token (0 when
    the last one is wrong). open-unlearning's loop scores that last case 1/T instead."""
    suffix_ok = hits.float().flip(1).cumprod(dim=1).flip(1)  # 1 where every token from here on is a hit
    return suffix_ok.sum(dim=1) / hits.shape[1]


def privleak(auc_value: float, reference_auc: float) -> float | None:
    """MUSE's privacy leakage in percent: (AUC - AUC_ref) / AUC_ref * 100 with MUSE's AUC, which is 1 - ours
    (MUSE ranks by the non-member score). 0: leaks like the reference; negative: the forget set is still
    recognised (under-unlearned, the original model is near -100); positive: over-unlearned. None when the
    reference is degenerate (AUC 1: MUSE's AUC 0)."""
    muse, muse_ref = 1.0 - auc_value, 1.0 - reference_auc
    if muse_ref <= 0 or not math.isfinite(auc_value):
        return None
    return (muse - muse_ref) / muse_ref * 100.0


def set_nll(model, sets: dict[str, torch.Tensor], batch_size: int, device: torch.device,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: token_nll(model, blocks, batch_size, device, dtype) for name, blocks in sets.items()}


def utility_subsample(blocks: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """A fixed subsample of `n` blocks (seeded, so every curve point of a run scores the same blocks)."""
    if n is None or n >= blocks.shape[0]:
        return blocks
    rows = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[rows.sort().values]


def curve_sets(data: UnlearnData, utility: bool = True, utility_blocks: int | None = None,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The sets a curve point scores: forget and unseen always (the stopping rule and the selected checkpoint
    need only them); retain and general when `utility`, on a fixed subsample of `utility_blocks` each."""
    sets = data.eval_sets()
    if not utility:
        return {name: sets[name] for name in ("forget", "unseen")}
    return {name: blocks if name in ("forget", "unseen") else utility_subsample(blocks, utility_blocks, seed)
            for name, blocks in sets.items()}


def curve_point(model, sets: dict[str, torch.Tensor], batch_size: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, float]:
    """The cheap in-run evaluation: mean NLL of each of `sets` (see `curve_sets`) and the forget gap."""
    return point_of(set_nll(model, sets, batch_size, device, dtype))


def point_of(nll: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean NLL per set (`{name}_nll`) and the forget gap, from per-token NLLs."""
    point = {f"{name}_nll": float(v.mean()) for name, v in nll.items()}
    if "forget_nll" in point and "unseen_nll" in point:
        point["forget_gap"] = point["forget_nll"] - point["unseen_nll"]
    return point


UTILITY_SETS = ("retain", "general")  # the utility drop is taken on retain, else on general
GAP_SETS = ("forget", "unseen")


def sample_se(values: torch.Tensor, population: int) -> float | None:
    """Standard error of the mean of `values`, a simple random sample without replacement of `population`
    blocks (finite-population correction); None when fewer than 2 were drawn."""
    n = values.numel()
    if n < 2:
        return None
    fpc = (population - n) / (population - 1) if population > 1 else 0.0
    return float(values.double().std() / math.sqrt(n) * math.sqrt(max(fpc, 0.0)))


class Screening:
    """A trial's in-run evaluation, cheap enough to run often: each curve point scores the forget gap, and
    utility at the points the caller asks for, on fixed seeded subsamples (`gap_blocks` blocks of forget and
    unseen, `utility_blocks` of retain and general; None: the whole set).

    A subsampled figure is a difference estimate: the set's value at step 0, scored whole (the original
    model's metrics), plus the mean change of its subsampled blocks since step 0. Changes vary far less from
    block to block than the NLLs themselves, so few blocks give a tight estimate, and it is unbiased for the
    whole set's value. Each comes with its standard error (`{set}_nll_se`, `forget_gap_se`, `utility_drop_se`:
    the drop is the retain change, else the general one), so it is shown as the estimate it is; a set scored
    whole has no `_se`. The kept checkpoint is scored whole afterwards (`full_metrics`)."""

    def __init__(self, data: UnlearnData, gap_blocks: int | None, utility_blocks: int | None, seed: int,
                 batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.full = data.eval_sets()
        self.sets = {name: utility_subsample(blocks, gap_blocks if name in GAP_SETS else utility_blocks, seed)
                     for name, blocks in self.full.items()}
        self.subsampled = {name for name in self.sets if self.sets[name].shape[0] < self.full[name].shape[0]}
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.start_values: dict[str, float] = {}
        self.start_blocks: dict[str, torch.Tensor] = {}

    def describe(self) -> dict[str, list[int]]:
        """What was subsampled, stored with the result: {set: [blocks scored at curve points, blocks in the
        set]}; empty when every set was scored whole."""
        return {name: [self.sets[name].shape[0], self.full[name].shape[0]] for name in sorted(self.subsampled)}

    def _score(self, model, names: list[str], whole: bool = False) -> tuple[dict[str, torch.Tensor], int]:
        sets = {name: (self.full if whole else self.sets)[name] for name in names}
        nll = set_nll(model, sets, self.batch_size, self.device, self.dtype)
        return {name: v.mean(1) for name, v in nll.items()}, sum(int(b.numel()) for b in sets.values())

    def start(self, model, baseline: dict[str, float]) -> int:
        """Score the subsampled blocks at step 0 (the model as it starts, whose whole-set values are
        `baseline`); returns the tokens scored."""
        self.start_values = {name: float(baseline[f"{name}_nll"]) for name in self.full}
        if not self.subsampled:
            return 0
        self.start_blocks, tokens = self._score(model, sorted(self.subsampled))
        return tokens

    def point(self, model, utility: bool, whole: bool = False) -> tuple[dict[str, float], int]:
        """One curve point (the forget gap, and utility when `utility`) and the tokens scored; `whole` scores
        every block of those sets, for a point a decision rests on."""
        names = list(self.sets) if utility else list(GAP_SETS)
        blocks, tokens = self._score(model, names, whole)
        point, errors = {}, {}
        for name, now in blocks.items():
            if name in self.subsampled and not whole:
                change = now - self.start_blocks[name]
                point[f"{name}_nll"] = self.start_values[name] + float(change.mean())
                errors[name] = sample_se(change, self.full[name].shape[0])
            else:
                point[f"{name}_nll"] = float(now.mean())
        point["forget_gap"] = point["forget_nll"] - point["unseen_nll"]
        point.update({f"{name}_nll_se": se for name, se in errors.items() if se is not None})
        if any(errors.get(name) is not None for name in GAP_SETS):  # independent samples of two sets
            point["forget_gap_se"] = math.sqrt(sum((errors.get(name) or 0.0) ** 2 for name in GAP_SETS))
        drop_set = "retain" if "retain" in blocks else "general" if "general" in blocks else None
        if drop_set is not None and errors.get(drop_set) is not None:
            point["utility_drop_se"] = errors[drop_set]
        return point, tokens


def leak_figures(metrics: dict[str, float], reference_auc: float) -> dict[str, float]:
    """privleak of a model's min-k AUC relative to `reference_auc`, with that reference (empty when privleak
    is undefined). The exact retrain's own figures take its own AUC: 0 by definition."""
    leak = privleak(metrics["mia_auc_mink"], reference_auc)
    return {} if leak is None else {"privleak": leak, "privleak_reference_auc": reference_auc}


def full_metrics(model, data: UnlearnData, batch_size: int, device: torch.device, dtype: torch.dtype,
                 baseline: dict[str, float] | None = None, *, original: dict[str, torch.Tensor] | None = None,
                 leak_reference: float | None = None, mink_k: float = MINK_K,
                 verbmem: VerbMemPlan | None = None) -> dict[str, float]:
    """Every metric of the brief for one model (`tuner.core.metrics` says what each means): `baseline` (the
    original model's metrics) gives utility drops, `original` (its per-block NLL, `original_metrics`) the
    reference MIA, `leak_reference` the AUC privleak is relative to (the exact retrain's; default: the
    approximate target's 0.5), `verbmem` MUSE's verbatim memorisation (off when None)."""
    return _measure(model, data, batch_size, device, dtype, baseline, original, leak_reference, mink_k, verbmem)[0]


def original_metrics(model, data: UnlearnData, batch_size: int, device: torch.device, dtype: torch.dtype,
                     leak_reference: float | None = None, mink_k: float = MINK_K,
                     verbmem: VerbMemPlan | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The original model's metrics (a study's baseline) and its mean NLL per forget and unseen block, the
    yardstick of every later model's reference MIA, from one scoring pass."""
    return _measure(model, data, batch_size, device, dtype, None, None, leak_reference, mink_k, verbmem)


def _measure(model, data: UnlearnData, batch_size: int, device: torch.device, dtype: torch.dtype,
             baseline: dict[str, float] | None, original: dict[str, torch.Tensor] | None,
             leak_reference: float | None, mink_k: float,
             verbmem: VerbMemPlan | None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    sets = data.eval_sets()
    # forget and unseen in one pass with the memorisation statistics; the utility sets need only their NLL
    stats = {name: token_stats(model, sets[name], batch_size, device, dtype) for name in GAP_SETS}
    nll = {name: stats[name][..., 0] if name in stats else token_nll(model, blocks, batch_size, device, dtype)
           for name, blocks in sets.items()}
    metrics = {f"{name}_nll": float(v.mean()) for name, v in nll.items()}
    metrics.update({f"{name}_ppl": _safe_exp(metrics[f"{name}_nll"]) for name in nll})
    metrics["forget_gap"] = metrics["forget_nll"] - metrics["unseen_nll"]
    for name in GAP_SETS:
        hits = stats[name][..., 1]
        metrics[f"{name}_em"] = float(exact_memorisation(hits).mean())
        metrics[f"{name}_es"] = float(extraction_strength(hits).mean())
    originals = original or {}
    members = mia_scores(nll["forget"], data.forget_zlib, mink_k, stats["forget"][..., 2], originals.get("forget"))
    nonmembers = mia_scores(nll["unseen"], data.unseen_zlib, mink_k, stats["unseen"][..., 2],
                            originals.get("unseen"))
    for kind in members:
        metrics[f"mia_auc_{kind}"] = auc(members[kind], nonmembers[kind])
    metrics["mia_auc"] = metrics["mia_auc_mink"]
    metrics["mink_k"] = mink_k
    metrics.update(leak_figures(metrics, APPROXIMATE_AUC if leak_reference is None else leak_reference))
    if verbmem is not None:
        for name in GAP_SETS:
            chosen = utility_subsample(sets[name], verbmem.blocks, verbmem.seed)
            score = verbatim_memorisation(model, chosen, verbmem, batch_size, device)
            if score is not None:  # no block with words to score: not measured
                metrics[f"{name}_verbmem"] = score
    if baseline is not None:
        for name in ("retain", "general"):
            if f"{name}_nll" in metrics and f"{name}_nll" in baseline:
                key = "utility_drop" if name == "retain" else "general_utility_drop"
                metrics[key] = metrics[f"{name}_nll"] - baseline[f"{name}_nll"]
        if "utility_drop" not in metrics and "general_utility_drop" in metrics:
            metrics["utility_drop"] = metrics["general_utility_drop"]
    return metrics, {name: nll[name].mean(dim=1) for name in GAP_SETS}


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
