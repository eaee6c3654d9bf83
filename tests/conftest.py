"""Shared fixtures: one micro testbed per test session, built for real into a private cache."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuner-cache")
    old = os.environ.get("TUNER_CACHE")
    os.environ["TUNER_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TUNER_CACHE", None)
    else:
        os.environ["TUNER_CACHE"] = old


@pytest.fixture(scope="session")
def bench(cache_dir):
    from tuner.models import Workbench

    return Workbench.open("testbed:micro")


@pytest.fixture(scope="session")
def data(bench):
    from tuner import testbed
    from tuner.data import build_data

    return build_data(testbed.data_spec(bench.source.testbed_root), bench.tokenizer, bench.reference.config)


@pytest.fixture(scope="session")
def baseline(bench, data):
    from tuner.evaluation import full_metrics

    return full_metrics(bench.reference, data, 32, torch.device("cpu"), torch.float32)


@pytest.fixture
def unlearn(bench, data, baseline):
    """Run one unlearning from pristine weights: unlearn(method=..., lr=..., **config)."""
    from tuner.unlearn import UnlearnConfig, run_unlearning

    def run(**fields):
        fields.setdefault("device", "cpu")
        cfg = UnlearnConfig(**fields)
        return run_unlearning(bench.fresh(), data, cfg, reference=bench.reference, baseline=baseline)

    return run
