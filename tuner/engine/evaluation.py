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

from tuner.engine.data import UnlearnData
from tuner.engine.distributed import eval_share, gather_rows, scoring_mode
from tuner.engine.lossfn import next_token_logits as next_token_logits  # re-exported for the methods' full-logit terms
from tuner.engine.lossfn import next_token_nll

MINK_FRACTION = 0.3  # the paper's Min-K% Prob sweep starts at k = 30%


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
    was_training = model.training
    model.eval()
    share = eval_share(blocks)
    on_device = share.to(device)  # one copy: a pageable host-to-device copy per batch would sync each time
    out = torch.empty(share.shape[0], share.shape[1] - 1, dtype=torch.float32, device=device)
    with scoring_mode(model):
        for start in range(0, share.shape[0], batch_size):
            with autocast_for(device, dtype):
                out[start:start + batch_size] = next_token_nll(model, on_device[start:start + batch_size])
    model.train(was_training)
    return gather_rows(out, blocks.shape[0]).cpu()


def auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(score(member) > score(non-member)), ties counting half: 0.5 means indistinguishable."""
    if members.numel() == 0 or nonmembers.numel() == 0:
        return float("nan")
    diff = members.double()[:, None] - nonmembers.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def mia_scores(nll: torch.Tensor, zlib_len: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Membership scores per block, higher = more likely seen in training."""
    k = max(1, math.ceil(nll.shape[1] * MINK_FRACTION))
    scores = {
        "loss": -nll.mean(dim=1),
        # Min-K% Prob: mean log-prob of the k% least likely tokens.
        "mink": -nll.topk(k, dim=1).values.mean(dim=1),
    }
    if zlib_len is not None:
        scores["zlib"] = -nll.sum(dim=1) / zlib_len.clamp(min=1.0)
    return scores


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


def full_metrics(model, data: UnlearnData, batch_size: int, device: torch.device, dtype: torch.dtype,
                 baseline: dict[str, float] | None = None) -> dict[str, float]:
    """Every metric of the brief for one model; `baseline` (the original model's) gives utility drops."""
    nll = set_nll(model, data.eval_sets(), batch_size, device, dtype)
    metrics = {f"{name}_nll": float(v.mean()) for name, v in nll.items()}
    metrics.update({f"{name}_ppl": _safe_exp(metrics[f"{name}_nll"]) for name in nll})
    metrics["forget_gap"] = metrics["forget_nll"] - metrics["unseen_nll"]
    members = mia_scores(nll["forget"], data.forget_zlib)
    nonmembers = mia_scores(nll["unseen"], data.unseen_zlib)
    for kind in members:
        metrics[f"mia_auc_{kind}"] = auc(members[kind], nonmembers[kind])
    metrics["mia_auc"] = metrics["mia_auc_mink"]
    if baseline is not None:
        for name in ("retain", "general"):
            if f"{name}_nll" in metrics and f"{name}_nll" in baseline:
                key = "utility_drop" if name == "retain" else "general_utility_drop"
                metrics[key] = metrics[f"{name}_nll"] - baseline[f"{name}_nll"]
        if "utility_drop" not in metrics and "general_utility_drop" in metrics:
            metrics["utility_drop"] = metrics["general_utility_drop"]
    return metrics


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
