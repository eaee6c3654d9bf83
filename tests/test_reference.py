"""The frozen reference is the policy at step 0: every method with a reference sees reference = policy before
its first update (NPO's log-ratio 0, GA+KL's KL 0, RMU's retain term 0, UNDIAL's teacher the policy's own
distribution), for full training and LoRA, in fp32 and mixed precision. The reference runs in eval mode and
under the policy's autocast, also when the model has dropout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ranks import small_data
from transformers import AutoModelForCausalLM

from tuner.core.precision import resolve_precision
from tuner.engine import methods
from tuner.engine.evaluation import autocast_for
from tuner.engine.lossfn import next_token_logits
from tuner.engine.methods.base import MethodContext
from tuner.engine.methods.undial import BETA as UNDIAL_BETA
from tuner.engine.models import Workbench
from tuner.engine.unlearn import UnlearnConfig, run_unlearning

CPU = torch.device("cpu")
# fp32: the same weights in the same dtypes, in batches of other rows; mixed: bf16 autocast (8 bits of mantissa)
# rounds each matmul, and batches of other shapes may round differently
TOLERANCE = {"fp32": 1e-5, "mixed": 2e-3}
FIXED = {"lr": 1e-3, "max_steps": 1, "batch_size": 8, "stop_at_target": False, "checkpoint": "last",
         "device": "cpu", "eval_batch_size": 8, "warmup_ratio": 0.0}
# what is 0 at step 0 when reference = policy: (logged loss part, its value at step 0)
STEP0 = {"npo": ("forget_npo", 2 / 0.1 * math.log(2)),  # -(2/β)·log σ(0) at the default β 0.1: log-ratio 0
         "ga_kl": ("retain_kl", 0.0),
         "rmu": ("retain_mse", 0.0)}
OWN = {"rmu": {"layer": 0, "steering_coeff": 2.0, "alpha": 10.0}}
COMBOS = [(m, a, p) for m in STEP0 for a in ("full", "lora") for p in ("fp32", "mixed")]


@pytest.fixture(scope="module")
def small(data):
    return small_data(data)


@pytest.fixture(scope="module")
def own_bench(bench) -> Workbench:
    """A workbench of this module's own: LoRA runs attach adapters to a workbench's model in place, and the
    session's is shared with other tests."""
    bench.fresh()  # detaches any adapters another test left attached
    return Workbench(copy.deepcopy(bench.original), bench.tokenizer, bench.source)


@pytest.fixture(scope="module")
def small_baseline(own_bench, small):
    from tuner.engine.evaluation import full_metrics

    return full_metrics(own_bench.original, small, 8, CPU, torch.float32)


@pytest.mark.parametrize(("method", "adapters", "precision"), COMBOS, ids=["-".join(c) for c in COMBOS])
def test_the_first_step_sees_reference_equal_to_policy(method, adapters, precision, own_bench, small,
                                                       small_baseline):
    cfg = UnlearnConfig(method=method, precision=precision, **OWN.get(method, {}),
                        **({"lora": {"r": 4}} if adapters == "lora" else {}), **FIXED)
    model, reference = own_bench.trainee(cfg, resolve_precision(precision, CPU))
    logs = []
    run_unlearning(model, small, cfg, reference=reference, baseline=small_baseline,
                   on_progress=lambda step, total, log: logs.append(log))
    part, expected = STEP0[method]
    assert abs(logs[0][part] - expected) < TOLERANCE[precision], (part, logs[0][part], expected)


def dropout_workbench(bench) -> Workbench:
    """The micro testbed's weights in a model whose config has dropout 0.1 everywhere."""
    bench.fresh()  # detaches any adapters another test left attached
    config = copy.deepcopy(bench.original.config)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(bench.original.state_dict())
    return Workbench(model, bench.tokenizer, bench.source)


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_a_lora_reference_runs_without_dropout_under_the_policy_s_autocast(precision, bench, data):
    """With adapters off the reference is the original model in eval mode: the same on every call while the
    adapted model trains with dropout, and UNDIAL's teacher is the policy's own distribution with the true
    token lowered by β."""
    plan = resolve_precision(precision, CPU)
    cfg = UnlearnConfig(method="undial", precision=precision, lora={"r": 4, "dropout": 0.1}, **FIXED)
    policy, reference = dropout_workbench(bench).trainee(cfg, plan)
    policy.train()
    ids = data.forget[:4]
    with torch.no_grad(), autocast_for(CPU, plan.compute):
        first, second = next_token_logits(reference, ids).float(), next_token_logits(reference, ids).float()
        restored = policy.training and all(m.training for m in policy.modules())
        policy.eval()
        own = next_token_logits(policy, ids).float()
        policy.train()
        trained = next_token_logits(policy, ids).float()
        after = next_token_logits(reference, ids).float()
    assert not torch.allclose(trained, own)  # the policy itself does train with dropout
    assert restored  # the reference call left the adapted model training, every module of it
    assert torch.equal(first, second) and torch.equal(first, after)
    assert (first - own).abs().max().item() < TOLERANCE[precision]

    method = methods.get("undial")()
    method.prepare(MethodContext(model=policy, reference=reference, forget=data.forget, device=CPU,
                                 dtype=plan.compute, seed=0, params=methods.get("undial").settings({}),
                                 eval_batch_size=8))
    with autocast_for(CPU, plan.compute):
        teacher = method.targets(ids)
    beta = method.value(UNDIAL_BETA)
    lowered = own.scatter_add(-1, ids[:, 1:, None], torch.full_like(own[..., :1], -beta))
    assert (teacher - torch.softmax(lowered, dim=-1)).abs().max().item() < TOLERANCE[precision]
