"""Shared fixtures: one micro testbed per test session, built for real into a private cache."""

from __future__ import annotations

import os
import uuid

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
    from tuner.precision import resolve_precision
    from tuner.unlearn import UnlearnConfig, run_unlearning

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
