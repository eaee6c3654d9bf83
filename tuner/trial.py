"""The Ray Tune trainable: one trial = one `run_unlearning` on a worker.

Each worker process loads the base model and tokenises the data once (a module-level cache that survives
across trials when Ray reuses the actor); every trial starts from a pristine copy of the weights. The
worker reads data and model itself, so driver and workers need not share a filesystem; results travel
back only through `tune.report`.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
from typing import Any

import torch

from tuner.data import DataSpec, build_data
from tuner.evaluation import full_metrics
from tuner.models import Workbench, fingerprint, load, resolve
from tuner.testbed import data_spec as testbed_data_spec
from tuner.unlearn import UnlearnConfig, resolve_device, resolve_dtype, run_unlearning

_WORKER: dict[str, Any] = {}


def objective_values(metrics: dict[str, float] | None, objectives: list[str]) -> dict[str, float]:
    """What the sampler minimises: distance to the approximate-retraining point, utility drop, and the
    MIA AUC's distance from 0.5. A trial without metrics (diverged) gets +inf on every objective."""
    if not metrics:
        return {f"obj_{name}": math.inf for name in objectives}
    values = {"forget_gap": abs(metrics["forget_gap"]), "utility_drop": metrics.get("utility_drop", 0.0),
              "mia_auc": abs(metrics.get("mia_auc", 0.5) - 0.5)}
    return {f"obj_{name}": float(values[name]) for name in objectives}


def _key(study: dict) -> str:
    return hashlib.sha256(json.dumps([study["model"], study["data"], study["seed"]], sort_keys=True).encode()).hexdigest()


def worker_state(study: dict) -> dict[str, Any]:
    """Model, data, baseline and (testbed) exact-retrain metrics, built once per worker process."""
    key = _key(study)
    if _WORKER.get("key") == key:
        return _WORKER
    _WORKER.clear()
    bench = Workbench.open(study["model"], study.get("trust_remote_code", False))
    if study["data"] is not None:
        spec = DataSpec.model_validate(study["data"])
    else:
        spec = testbed_data_spec(bench.source.testbed_root)
    data = build_data(spec, bench.tokenizer, bench.reference.config, seed=study["seed"])
    run = study["run"]
    device = resolve_device(run.get("device", "auto"))
    dtype = resolve_dtype(run.get("dtype", "auto"), device)
    bench.reference.to(device)
    batch = run.get("eval_batch_size", 16)
    baseline = full_metrics(bench.reference, data, batch, device, dtype)
    exact = None
    if bench.source.retrain_path is not None:
        retrain, _ = load(resolve(str(bench.source.retrain_path)))
        exact = full_metrics(retrain.to(device), data, batch, device, dtype)
        del retrain
    _WORKER.update(key=key, bench=bench, data=data, baseline=baseline, exact_retrain=exact,
                   data_summary={"blocks": data.summary(), "sources": data.sources, "sha256": data.fingerprints(),
                                 "model": fingerprint(bench.reference.config)})
    return _WORKER


def run_trial(params: dict[str, Any], study: dict[str, Any], report) -> dict[str, Any]:
    """Run one trial and hand every curve point and the final result to `report` (tune.report in Ray)."""
    if study.get("threads"):
        torch.set_num_threads(int(study["threads"]))
    state = worker_state(study)
    cfg = UnlearnConfig(method=study["method"], retain_source=study["retain_source"] or "in_distribution",
                        seed=study["seed"], lr=params["lr"], epochs=params["epochs"],
                        retain_weight=params.get("retain_weight", 1.0), **study["run"])
    baseline = state["baseline"]
    objectives = study["objectives"]

    def on_eval(point: dict[str, float]) -> None:
        partial = dict(point)
        if "retain_nll" in point and "retain_nll" in baseline:
            partial["utility_drop"] = point["retain_nll"] - baseline["retain_nll"]
        partial.setdefault("mia_auc", 0.5)
        report({"kind": "curve", "curve_point": point, **objective_values(partial, objectives)})

    result = run_unlearning(state["bench"].fresh(), state["data"], cfg, reference=state["bench"].reference,
                            baseline=baseline, on_eval=on_eval)
    payload = result.to_dict()
    final = {"kind": "final", "status": result.status, "payload": payload, "host": socket.gethostname(),
             "baseline": baseline, "exact_retrain": state["exact_retrain"], "data_summary": state["data_summary"],
             **objective_values(result.metrics, objectives)}
    report(final)
    return final


def trainable(config: dict[str, Any], study: dict[str, Any]) -> None:
    """Ray Tune function trainable (bound with `tune.with_parameters(trainable, study=...)`)."""
    from ray import tune

    run_trial(config, study, tune.report)
