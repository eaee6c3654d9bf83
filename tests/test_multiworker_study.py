"""A study whose trials span 2 workers (Ray Train, gloo, CPU) through the real CLI: one rank is killed mid-trial,
that trial fails with a reason naming the rank and node, the next trial completes on 2 ranks, and the store,
the export and the dashboard table record world size 2."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from procs import wait_for_step

from tuner.core.status import SCORED
from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))


def rank_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train worker processes (one per rank) under the study's local Ray."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
    return found


def wait_for_ranks(proc: subprocess.Popen, n: int, timeout: float = 300) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        ranks = rank_processes(proc)
        if len(ranks) >= n:
            return ranks
        time.sleep(0.2)
    pytest.fail(f"{n} rank processes never appeared")


def test_two_worker_study_survives_a_killed_rank_and_records_world_size(tmp_path, cache_dir, bench, spec_file):
    from dashboards.data import load_study, table_rows
    from tuner.results.export import build_export

    spec = spec_file(tmp_path, name="two-ranks", budget={"trials": 2},
                     search={"lr": {"low": 2e-4, "high": 1e-3}, "epochs": {"low": 1, "high": 1}},
                     run={"batch_size": 4, "eval_every": 2, "stop_at_target": False},
                     resources={"cpus": 0.5, "workers": 2})  # 2 x 0.5 CPUs + the trial's token share: fits 2 cores
    url = f"sqlite:///{tmp_path / 'ranks.db'}"
    proc = subprocess.Popen([TUNER, "study", "run", str(spec), "--storage", url], env={**os.environ, "RAY_ADDRESS": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_ranks(proc, 2)
        wait_for_step(Store(url), "two-ranks", proc)
        rank_processes(proc)[-1].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, output

    store = Store(url)
    rows = store.trials("two-ranks")
    assert [r["number"] for r in rows] == [1, 2], rows
    failed, done = rows
    assert failed["status"] == "failed", failed
    assert re.search(r"rank [01] on node \S+ \(\w+\) died", failed["error"]), failed["error"]
    print(f"failed trial: {failed['error']}")
    assert done["status"] in SCORED and done["metrics"], done
    assert done["world_size"] == 2 and done["effective_batch"] == 8
    env = done["result"]["environment"]
    assert env["engine"] == "ray.train.torch.TorchTrainer" and env["sharding"] == "ddp" and env["backend"] == "gloo"
    assert [r["rank"] for r in env["ranks"]] == [0, 1]
    print(f"completed trial: world_size {done['world_size']}, effective_batch {done['effective_batch']}, "
          f"engine {env['engine']}, sharding {env['sharding']}, backend {env['backend']}")
    assert failed["world_size"] == 2  # a failed trial still records what it ran on
    assert store.study("two-ranks").status == "finished"

    exported = build_export(store, "two-ranks", "ga_gd")
    assert exported["provenance"]["environment"]["world_size"] == 2
    assert exported["config"]["world_size"] == 2 and exported["config"]["batch_size"] == 4
    table = {r["id"]: r for r in table_rows(load_study(store, "two-ranks"))}
    assert table[done["id"]]["world_size"] == 2 and table[done["id"]]["sharding"] == "ddp"
