"""RMU: forget activations at the chosen layer move to c·u, retain activations stay with the original model's,
and the forget NLL rises, on the micro testbed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuner.core.errors import TunerError
from tuner.engine import methods
from tuner.engine.methods.base import Batch, MethodContext
from tuner.engine.methods.rmu import steering_vector
from tuner.engine.probe import decoder_layers, layer_output
from tuner.engine.training import OptimConfig, run_loop
from tuner.engine.unlearn import UnlearnConfig

FIXED = {"stop_at_target": False, "checkpoint": "last", "device": "cpu"}


def prepared(bench, data, model, seed=0, **params):
    method = methods.get("rmu")()
    method.prepare(MethodContext(model=model, reference=bench.reference, forget=data.forget,
                                 device=torch.device("cpu"), dtype=torch.float32, seed=seed,
                                 params=methods.get("rmu").settings(params), eval_batch_size=32))
    return method


def test_rmu_declares_layer_steering_and_alpha():
    cls = methods.get("rmu")
    assert cls.hyperparameters() == ["lr", "epochs", "layer", "steering_coeff", "alpha"]
    assert cls.needs_reference and cls.uses_retain and not cls.has_retain_term  # α, not λ, weights retain
    assert not cls.reference_distributions and cls.full_logit_streams == 0
    assert UnlearnConfig(method="rmu", layer=1, steering_coeff=20, alpha=100).params["layer"] == 1
    with pytest.raises(ValueError, match="method 'rmu'.*layer.*whole"):
        UnlearnConfig(method="rmu", layer=1.5)
    with pytest.raises(ValueError, match="method 'rmu'.*alpha"):
        UnlearnConfig(method="rmu", alpha=0)


def test_rmu_refuses_a_layer_the_model_does_not_have(bench, data):
    n = len(decoder_layers(bench.reference))
    with pytest.raises(TunerError, match=f"layer 7 .*{n} decoder layers"):
        prepared(bench, data, bench.fresh(), layer=7)  # an explicit layer is a layer index: micro has fewer


def test_rmu_default_layer_and_search_range_follow_the_model_s_depth(bench, data):
    """WMDP's layer 7 of 32 is the default on zephyr-sized models; smaller ones get the layer at the same depth."""
    from tuner.engine.methods.rmu import LAYER
    from tuner.study.spec import validate_spec

    assert [LAYER.at_depth(n).default for n in (32, 80, 8, 4, 2)] == [7, 18, 2, 1, 0]
    assert (LAYER.at_depth(32).low, LAYER.at_depth(32).high, LAYER.at_depth(4).high) == (0, 7, 1)
    assert "layer" not in UnlearnConfig(method="rmu").params  # resolved once the model is known
    method = prepared(bench, data, bench.fresh())
    assert method.ctx.params["layer"] == 0 and method.layer is decoder_layers(bench.fresh())[0]
    assert list(method.ctx.params) == methods.get("rmu").hyperparameters()  # in declaration order
    spec = validate_spec({"name": "r", "model": "testbed:micro", "methods": ["rmu"]}, "spec")
    assert spec.space_for("rmu", depth=4)["layer"].model_dump() == {"low": 0, "high": 1, "log": False}
    assert spec.space_for("rmu")["layer"].high == 7  # without a model: the range as declared for 32 layers
    narrowed = validate_spec({"name": "r", "model": "testbed:micro", "methods": ["rmu"],
                              "search": {"layer": {"low": 1, "high": 1}}}, "spec")
    assert narrowed.space_for("rmu", depth=4)["layer"].model_dump() == {"low": 1, "high": 1, "log": False}


def test_rmu_runs_with_its_defaults(unlearn):
    """`tuner unlearn --model testbed:micro --method rmu --lr 1e-3` ran into "layer 7 does not exist"."""
    result = unlearn(method="rmu", lr=1e-3, max_steps=2, **FIXED)
    assert result.status == "completed" and result.config["params"]["layer"] == 0


def test_rmu_steering_vector_is_a_seeded_positive_unit_vector():
    u = steering_vector(64, seed=0)
    assert u.shape == (64,) and (u >= 0).all() and abs(u.norm().item() - 1) < 1e-6
    assert torch.equal(u, steering_vector(64, seed=0)) and not torch.equal(u, steering_vector(64, seed=1))


def test_rmu_steers_forget_activations_and_keeps_retain_activations(bench, data):
    torch.manual_seed(0)  # dropout masks
    model = bench.fresh()
    # c sized to the micro model's activations (RMS ~0.26 a unit, norm ~2 at layer 1), as c = 6.5 is to zephyr's
    method = prepared(bench, data, model, layer=1, steering_coeff=2.0, alpha=10.0)
    assert method.layer is decoder_layers(model)[1]
    retain = data.retain_for("in_distribution")
    forget_ids, retain_ids = data.forget[:16], retain[:16]
    with torch.no_grad():
        ref_forget = layer_output(bench.reference, method.ref_layer, forget_ids)
        ref_retain = layer_output(bench.reference, method.ref_layer, retain_ids)
    target = (2.0 * method.u).expand_as(ref_forget)

    def distances():
        """(forget MSE to c·u, forget MSE to the original's, retain MSE to the original's)"""
        with torch.no_grad():
            model.eval()
            forget = layer_output(model, method.layer, forget_ids)
            out = (F.mse_loss(forget, target).item(), F.mse_loss(forget, ref_forget).item(),
                   F.mse_loss(layer_output(model, method.layer, retain_ids), ref_retain).item())
            model.train()
        return out

    to_target_before, _, drift_before = distances()
    assert drift_before < 1e-10  # the model starts as the original

    def micro(step, _):
        rows = torch.arange(step * 8, step * 8 + 8) % data.forget.shape[0]
        return method.loss(model, Batch(forget=data.forget[rows], forget_rows=rows, retain=retain[rows]))

    run_loop(model, micro, 8, 1, OptimConfig(lr=1e-3, warmup_ratio=0), torch.device("cpu"))
    to_target, forget_moved, retain_drift = distances()
    assert to_target < 0.85 * to_target_before  # forget activations moved toward c·u
    # retain activations stay near the original's: small against their size, and less moved than the forget
    # ones (the micro testbed's forget and retain text are alike, so 8 steps separate them only partly)
    assert retain_drift < 0.1 * ref_retain.pow(2).mean().item()
    assert retain_drift < forget_moved


def test_rmu_raises_forget_nll(unlearn, baseline):
    result = unlearn(method="rmu", lr=1e-3, max_steps=6, layer=1, steering_coeff=20.0, alpha=1.0, **FIXED)
    assert result.status == "completed"
    # RMU acts on activations, not on the NLL: on the micro testbed 6 steps raise it by ~0.2 nats
    assert result.metrics["forget_nll"] > baseline["forget_nll"] + 0.1
