"""The database stops and restarts during a study: a private PostgreSQL server (initdb + pg_ctl, so the
machine's shared server is never touched) is stopped while a trial runs and started again seconds later."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from procs import free_port, wait_for_step

from tuner.core.status import SCORED
from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))


class PrivatePostgres:
    def __init__(self, root: Path) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl") or ""]
        if not found[-1]:
            if os.environ.get("TUNER_REQUIRE_PG"):
                raise RuntimeError("pg_ctl not found")
            pytest.skip("PostgreSQL server binaries (pg_ctl, initdb) not installed")
        self.bin = Path(found[-1]).parent
        self.root, self.port = root, free_port()
        self.data = root / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "tuner")

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/tuner"


@pytest.fixture
def postgres(tmp_path_factory):
    server = PrivatePostgres(Path("/tmp") / f"pg{free_port()}")  # short: the socket path has a length limit
    server.init()
    yield server
    subprocess.run([*server.as_user, str(server.bin / "pg_ctl"), "-D", str(server.data), "-m", "immediate",
                    "stop"], capture_output=True)
    shutil.rmtree(server.root, ignore_errors=True)


def test_a_study_rides_out_a_database_restart(tmp_path, cache_dir, bench, postgres, spec_file):
    spec = spec_file(tmp_path, name="outage", budget={"trials": 2},
                     search={"lr": {"low": 2e-4, "high": 1e-3}, "epochs": {"low": 2, "high": 3}},
                     run={"eval_every": 2})
    proc = subprocess.Popen([TUNER, "study", "run", str(spec), "--storage", postgres.url],
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    store = Store(postgres.url)
    wait_for_step(store, "outage", proc)  # stop the database once the first trial is reporting its curve
    store.engine.dispose()
    postgres.stop()
    time.sleep(8)  # the trial keeps reporting into a driver whose database is gone
    postgres.start()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "database unavailable" in output and "database back" in output
    rows = Store(postgres.url).trials("outage")
    assert [r["number"] for r in rows] == [1, 2]  # nothing lost, nothing counted twice
    assert all(r["status"] in SCORED for r in rows), rows
    first = rows[0]
    steps = [p["step"] for p in Store(postgres.url).curve(first["id"])]
    assert len(steps) == len(set(steps)) >= 3  # the curve points reported during the outage were kept
    states = [t.state for t in optuna.load_study(study_name="outage/ga_gd@in_distribution", storage=postgres.url
                                                 .replace("postgresql://", "postgresql+psycopg://")).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
