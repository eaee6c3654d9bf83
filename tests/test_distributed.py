"""A run sharded over ranks (Ray Train, gloo, CPU) gives the result of one process at the same effective batch."""

from __future__ import annotations

import math
import os

import pytest

COMMON = {"lr": 1e-3, "max_steps": 4, "eval_every": 2, "seed": 3, "retain_weight": 1.0, "warmup_ratio": 0.0,
          "stop_at_target": False, "checkpoint": "last", "device": "cpu", "precision": "fp32", "eval_batch_size": 7}
TOLERANCE = 1e-5  # fp32: the ranks sum the same terms in another order (gradient all-reduce, per-rank means)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


CASES = [("ga_gd", "ddp"), ("ga_kl", "ddp"), ("ga_kl", "fsdp")]


@pytest.fixture(scope="module")
def sharded(local_ray, bench, data, baseline):
    """Every case on the same 2 Ray Train ranks, one after another (one worker group start for all): (method,
    sharding) -> rank 0's `rank_unlearn` result."""
    from tuner.study.multiworker import rank_unlearn, torch_trainer

    def each_case(config):  # a local function: Ray ships it by value to the ranks
        return [rank_unlearn({**config, "cfg": cfg}) for cfg in config["cfgs"]]

    cfgs = [{"method": m, "batch_size": 4, "world_size": 2, "sharding": s, **COMMON} for m, s in CASES]
    trainer = torch_trainer(each_case, {"model": bench.reference, "data": data, "baseline": baseline,
                                        "cfgs": cfgs}, workers=2, cpus=1, gpus=0)
    return dict(zip(CASES, trainer.fit().return_value, strict=True))


@pytest.mark.parametrize(("method", "sharding"), CASES)
def test_two_workers_give_the_one_worker_result(method, sharding, sharded, unlearn):
    """Batch 4 on each of 2 ranks = batch 8 on one process: identical curve and final metrics (within 1e-5)."""
    one = unlearn(method=method, batch_size=8, **COMMON)
    two = sharded[(method, sharding)]

    assert two["environment"]["world_size"] == 2 and two["environment"]["sharding"] == sharding
    assert two["environment"]["backend"] == "gloo"
    assert two["environment"]["effective_batch"] == one.environment["effective_batch"] == 8
    assert two["steps_done"] == one.steps_done == 4 and two["train_tokens"] == one.train_tokens
    assert [p["step"] for p in two["curve"]] == [p["step"] for p in one.curve] == [0, 2, 4]
    for p1, p2 in zip(one.curve, two["curve"], strict=True):
        assert p1.keys() == p2.keys()
        assert all(_close(p1[k], p2[k]) for k in p1), (p1, p2)
    assert one.curve[-1]["forget_nll"] - one.curve[0]["forget_nll"] > 0.01  # the run did move the weights
    assert one.metrics.keys() == two["metrics"].keys()
    assert all(_close(one.metrics[k], two["metrics"][k]) for k in one.metrics), (one.metrics, two["metrics"])
    pairs = [*zip(one.curve, two["curve"], strict=True), (one.metrics, two["metrics"])]
    diffs = [(abs(a[k] - b[k]), abs(a[k] - b[k]) / max(abs(a[k]), 1e-12), k) for a, b in pairs for k in a
             if math.isfinite(a[k])]
    absolute, relative = max(d for d in diffs if not d[2].endswith("_ppl")), max(diffs, key=lambda d: d[1])
    print(f"{method}/{sharding}: largest |1 worker - 2 workers|: {absolute[0]:.1e} ({absolute[2]}; perplexities "
          f"left out), largest relative {relative[1]:.1e} ({relative[2]})")


def test_the_spec_takes_workers_per_trial_and_refuses_shared_gpus_across_ranks():
    from tuner.core.errors import TunerError
    from tuner.study.spec import validate_spec

    base = {"name": "w", "model": "testbed:micro"}
    spec = validate_spec({**base, "resources": {"workers": 4, "gpus": 1, "sharding": "fsdp"}}, "spec")
    assert (spec.resources.workers, spec.resources.gpus, spec.resources.sharding) == (4, 1.0, "fsdp")
    assert validate_spec({**base, "resources": {"gpus": 0.5}}, "spec").resources.workers == 1  # still shareable
    with pytest.raises(TunerError, match="whole GPUs"):
        validate_spec({**base, "resources": {"workers": 2, "gpus": 0.5}}, "spec")
    with pytest.raises(TunerError, match="resources.workers"):
        validate_spec({**base, "resources": {"workers": 0}}, "spec")


def test_the_one_worker_path_imports_no_ray():
    """Machines without Ray (the device machine) run trials through run_unlearning: it must not need Ray."""
    import subprocess
    import sys

    code = ("import sys, tuner.engine.unlearn, tuner.engine.distributed; "
            "sys.exit(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_trainer_polls_its_ranks_often_unless_the_user_says_otherwise(monkeypatch):
    """A rank's report waits for the controller's next poll of the ranks: the trial's trainer asks for one every
    0.2 s (Ray Train's 2 s would idle every rank up to 2 s per curve point); a value the user set stays."""
    from tuner.study.multiworker import POLL_ENV, torch_trainer

    monkeypatch.delenv(POLL_ENV, raising=False)
    torch_trainer(lambda config: None, {}, workers=2, cpus=1, gpus=0)
    assert float(os.environ[POLL_ENV]) <= 0.25
    monkeypatch.setenv(POLL_ENV, "5")
    torch_trainer(lambda config: None, {}, workers=2, cpus=1, gpus=0)
    assert os.environ[POLL_ENV] == "5"
