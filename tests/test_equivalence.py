"""Every method gives the same trial on 2 data-parallel ranks (DDP, FSDP2) as on one process at the same effective
batch: method × {1 rank, 2 ranks ddp, 2 ranks fsdp} × {fp32, mixed} × {full, LoRA}, on the micro testbed.

The 2-rank runs are gloo process groups on CPU started with torch.multiprocessing (tests/ranks.py); all of them
run in one group start, and each combination is its own test (the ids name it: `rmu-ddp-fp32-full`)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from procs import free_port
from ranks import run_job, run_on_ranks, small_data

from tuner.engine import methods

METHODS = list(methods.available())
SHARDINGS = ("ddp", "fsdp")
# largest |1 rank - 2 ranks| of the forget NLL, in nats. fp32: the ranks sum the same terms in another order
# (gradient all-reduce, per-rank means): ~5e-7 seen
TOLERANCE = {"fp32": 1e-5,
             # mixed: bf16 autocast rounds each matmul to 8 bits of mantissa, and a batch of 4 rows and one of 8
             # may round differently (other kernel blocking): up to ~2e-4 seen; RMU's unaveraged DDP gradients
             # gave 3e-3
             "mixed": 1e-3}
COMMON = {"lr": 1e-3, "max_steps": 2, "eval_every": 2, "seed": 3, "warmup_ratio": 0.0, "stop_at_target": False,
          "checkpoint": "last", "device": "cpu", "eval_batch_size": 8}
# methods whose own knobs need settings for the micro testbed's scale (RMU's c and α are sized for zephyr-7b)
OWN = {"rmu": {"layer": 0, "steering_coeff": 2.0, "alpha": 10.0}}
# LoRA changes what trains and what the reference is (the model with its adapters off): it is checked with the
# methods that read a reference or stop the forward early, and with one that does neither (ga_gd), whose path
# the other methods share. Mixed precision changes the dtypes of the loss and of what is precomputed: checked
# with the methods that precompute from the original (npo), read a reference (ga_kl) or a layer (rmu), and ga_gd.
LORA = ("ga_gd", "ga_kl", "undial", "rmu")
MIXED = ("ga_gd", "npo", "ga_kl", "rmu")


def job(method: str, precision: str, adapters: str, world: int, sharding: str = "ddp") -> dict:
    return {"method": method, **OWN.get(method, {}), "precision": precision, "batch_size": 8 // world,
            "world_size": world, "sharding": sharding, **({"lora": {"r": 4}} if adapters == "lora" else {}),
            **COMMON}


def not_meaningful(method: str, precision: str, adapters: str) -> str | None:
    """Why a combination is left out, or None."""
    if precision == "mixed" and adapters == "lora":
        return "mixed × LoRA: autocast and adapters meet in no code of their own (each is checked on its own)"
    if adapters == "lora" and method not in LORA:
        return f"LoRA: {method} runs ga_gd's path (no reference, a full forward), checked with ga_gd"
    if precision == "mixed" and method not in MIXED:
        return f"mixed: {method} runs no dtype-dependent path of its own beyond those of {', '.join(MIXED)}"
    return None


def key(method: str, ranks: str, precision: str, adapters: str) -> str:
    return f"{method}-{ranks}-{precision}-{adapters}"


# grouped by ranks, so that each process group starts once (at its first test)
COMBOS = [(m, r, p, a) for r in ("1rank", *SHARDINGS) for m in METHODS for p in ("fp32", "mixed")
          for a in ("full", "lora")]


@pytest.fixture(scope="module")
def small(data):
    return small_data(data, train=8, held=4)


@pytest.fixture(scope="module")
def original(bench) -> torch.nn.Module:
    """The pristine micro testbed model (every run takes a private copy of it)."""
    bench.fresh()  # detaches any adapters another test left attached
    return copy.deepcopy(bench.original)


@pytest.fixture(scope="module")
def small_baseline(original, small):
    from tuner.engine.evaluation import full_metrics

    return full_metrics(original, small, 8, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def one_rank(original, small, small_baseline):
    """1-rank runs at batch 8, made once each and kept."""
    done: dict[str, dict] = {}

    def get(method: str, precision: str, adapters: str) -> dict:
        k = key(method, "1rank", precision, adapters)
        if k not in done:
            done[k] = run_job(original, small, small_baseline, job(method, precision, adapters, 1))
        return done[k]

    return get


@pytest.fixture(scope="module")
def two_ranks(original, small, small_baseline, tmp_path_factory):
    """The meaningful 2-rank combinations of one sharding, all in one process group start (at the first test of
    that sharding); results kept by job key."""
    done: dict[str, dict] = {}

    def get(method: str, sharding: str, precision: str, adapters: str) -> dict:
        k = key(method, sharding, precision, adapters)
        if k not in done:
            jobs = {key(m, s, p, a): job(m, p, a, 2, s) for m, s, p, a in COMBOS
                    if s == sharding and not_meaningful(m, p, a) is None}
            started = time.perf_counter()
            done.update(run_on_ranks(original, small, small_baseline, jobs,
                                     tmp_path_factory.mktemp(sharding), free_port()))
            print(f"\n{len(jobs)} runs on 2 ranks ({sharding}) in {time.perf_counter() - started:.0f} s")
        return done[k]

    return get


@pytest.mark.parametrize(("method", "ranks", "precision", "adapters"), COMBOS, ids=[key(*c) for c in COMBOS])
def test_two_ranks_give_the_one_rank_trial(method, ranks, precision, adapters, one_rank, two_ranks, small_baseline):
    reason = not_meaningful(method, precision, adapters)
    if reason:
        pytest.skip(reason)
    one = one_rank(method, precision, adapters)
    assert one["status"] == "completed"
    moved = abs(one["metrics"]["forget_nll"] - small_baseline["forget_nll"])
    if ranks == "1rank":  # the run trained: a match below cannot be two runs that did nothing
        assert moved > 10 * TOLERANCE[precision], (method, moved)
        return
    two = two_ranks(method, ranks, precision, adapters)
    assert "error" not in two, two.get("error")
    assert two["environment"] == {"world_size": 2, "sharding": ranks, "effective_batch": 8}
    a, b = one["metrics"]["forget_nll"], two["metrics"]["forget_nll"]
    print(f"{key(method, ranks, precision, adapters)}: forget NLL 1 rank {a:.7f}, 2 ranks {b:.7f}, "
          f"|diff| {abs(a - b):.1e}")
    assert abs(a - b) <= TOLERANCE[precision], (a, b)
