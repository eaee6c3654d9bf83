"""Shared fixtures: one micro testbed per test session, built for real into a private cache; the builders of a
micro study spec, a micro study run in-process, a store; one local Ray per study module."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The testbed cache of this test run. Under pytest-xdist its workers share one (the parent of their base
    temp folders is this run's own), so the micro testbed is built once, not once per worker at half speed."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "tuner-cache"
        path.mkdir(exist_ok=True)
    else:
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
    from filelock import FileLock

    from tuner.engine.models import Workbench

    with FileLock(cache_dir / "micro.lock"):  # the other worker waits for the build instead of racing it
        return Workbench.open("testbed:micro")


@pytest.fixture(scope="session")
def data(bench):
    from tuner.engine import testbed
    from tuner.engine.data import build_data

    return build_data(testbed.data_spec(bench.source.testbed_root), bench.tokenizer, bench.reference.config)


@pytest.fixture(scope="session")
def baseline(bench, data):
    from tuner.engine.evaluation import full_metrics

    return full_metrics(bench.reference, data, 32, torch.device("cpu"), torch.float32)


@pytest.fixture
def unlearn(bench, data, baseline):
    """Run one unlearning from pristine weights: unlearn(method=..., lr=..., **config)."""
    from tuner.core.precision import resolve_precision
    from tuner.engine.unlearn import UnlearnConfig, run_unlearning

    def run(**fields):
        fields.setdefault("device", "cpu")
        cfg = UnlearnConfig(**fields)
        model, reference = bench.trainee(cfg, resolve_precision(cfg.precision, torch.device(cfg.device)))
        return run_unlearning(model, data, cfg, reference=reference, baseline=baseline)

    return run


PG_ADMIN_URL = os.environ.get("TUNER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this test session (CI requires it; elsewhere skipped if absent)."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        if os.environ.get("TUNER_REQUIRE_PG"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {err}")
    name = f"tuner_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Each store test runs on a new SQLite file and on a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    base = request.getfixturevalue("pg_database")
    name = f"t{uuid.uuid4().hex[:8]}"
    import psycopg

    with psycopg.connect(base.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return f"{base}?options=-csearch_path%3D{name}"


# ---- micro studies ---------------------------------------------------------------------------------------------

# The smallest study that trains: one unit, one trial, no robustness checks, no lr calibration. Tests name what
# they need beyond it.
MICRO_SPEC: dict[str, Any] = {
    "name": "micro", "model": "testbed:micro", "methods": ["ga_gd"], "retain_sources": ["in_distribution"],
    "budget": {"trials": 1}, "concurrency": 1, "sampler": {"name": "random"},
    "robustness": {"when": "off", "seeds": 1}, "calibration": {"enabled": False},
    "search": {"lr": {"low": 3e-4, "high": 2e-3}, "epochs": {"low": 1, "high": 2}},
    "run": {"device": "cpu"},
}


def build_micro_spec(run: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """MICRO_SPEC with `fields` replacing its top-level keys; `run` adds to its run block (device cpu stays)."""
    doc = copy.deepcopy(MICRO_SPEC)
    doc.update(copy.deepcopy(fields))
    doc["run"] = {**doc["run"], **(run or {})}
    return doc


def write_micro_spec(folder: Path, run: dict[str, Any] | None = None, **fields: Any) -> Path:
    """The micro spec as `folder/study.yaml`, for `tuner study run` and `load_spec`."""
    path = Path(folder) / "study.yaml"
    path.write_text(yaml.safe_dump(build_micro_spec(run, **fields)))
    return path


@pytest.fixture(scope="session")
def micro_spec() -> Callable[..., dict[str, Any]]:
    """micro_spec(**fields) -> the micro study as a dict (see build_micro_spec)."""
    return build_micro_spec


@pytest.fixture(scope="session")
def spec_file() -> Callable[..., Path]:
    """spec_file(folder, **fields) -> the micro study written to folder/study.yaml."""
    return write_micro_spec


@pytest.fixture(scope="session")
def micro_study(bench) -> Callable[..., str]:
    """micro_study(folder, **fields) -> the URL of a SQLite store in `folder` holding that micro study, run to
    its end in this process by `tuner.study.orchestrator.run_study`. On the module's `local_ray` when the caller
    holds it (a module fixture asks for both); otherwise the study starts and stops its own Ray."""
    from tuner.store import Store
    from tuner.study.orchestrator import run_study
    from tuner.study.spec import load_spec

    def run(folder: Path, run: dict[str, Any] | None = None, **fields: Any) -> str:
        spec, text = load_spec(write_micro_spec(folder, run, **fields))
        url = f"sqlite:///{Path(folder) / spec.name}.db"
        run_study(spec, text, Store(url))
        return url

    return run


@pytest.fixture(scope="module")
def local_ray(cache_dir):
    """One local Ray for a test module's in-process studies, started as `tuner study run` starts it
    (`tuner.study.cluster.start_ray`): `run_study` leaves a Ray it did not start running, so the module's studies
    share it and it stops once, after the module. After the testbed cache is set: Ray's workers inherit it."""
    import ray

    from tuner.study.cluster import start_ray

    started = start_ray(None)
    yield
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def store_file(tmp_path) -> str:
    """The URL of a new, empty SQLite store (its tables made), so a test can check that nothing was written."""
    from tuner.store import Store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url)
    return url


# ---- scheduling ------------------------------------------------------------------------------------------------

# The modules that took longest in a run of the suite (seconds per module, 2026-12-07, at dbda0a8) run first: with
# `-n 2 --dist loadfile` each worker takes the next whole module when it is free, so a long module collected last
# would run alone at the end. Only the order changes; a stale list costs time, never a test.
SLOWEST_FIRST = ("test_faults.py", "test_study.py", "test_robustness_study.py", "test_bad_input.py",
                 "test_security.py", "test_new_methods_study.py", "test_recommend.py", "test_cluster.py",
                 "test_multiworker_study.py", "test_equivalence.py", "test_dashboards.py", "test_cli.py",
                 "test_store_outage.py", "test_warm_start.py")


def pytest_collection_modifyitems(config, items):
    """The slowest modules first, each module's tests kept together and in their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
