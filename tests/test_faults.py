"""Faults during a study: a trial process killed, a trial out of memory. Each study runs through the real
CLI (local Ray, Optuna, SQLite); the fault is injected into the real trial process from outside.
(Driver killed and resumed, and a diverging method: tests/test_study.py. A worker node lost:
tests/test_cluster.py. The database restarting: tests/test_store_outage.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psutil
import pytest
from procs import wait_for_step

from tuner.core.status import SCORED
from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))


def start_study(spec_file: Callable[..., Path], tmp_path: Path, name: str, trials: int,
                env: dict[str, str] | None = None, merge: bool = True, epochs: tuple[int, int] = (2, 3),
                **run) -> tuple[subprocess.Popen, str]:
    """`tuner study run` of a micro study whose trials last long enough (`epochs`, no early stop) for a fault
    to land."""
    spec = spec_file(tmp_path, name=name, budget={"trials": trials},
                            search={"lr": {"low": 2e-4, "high": 1e-3}, "epochs": {"low": epochs[0], "high": epochs[1]}},
                            run={"eval_every": 4, "prune_hopeless": False, "stop_on_collapse": False, **run})
    url = f"sqlite:///{tmp_path / 'faults.db'}"
    env = {**os.environ, "RAY_ADDRESS": "", **(env or {})}
    proc = subprocess.Popen([TUNER, "study", "run", str(spec), "--storage", url], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True)
    return proc, url


def find_trial(proc: subprocess.Popen) -> psutil.Process | None:
    """The Ray actor running the trainable, once it is inside a trial (its title says so)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "ImplicitFunc.train" in " ".join(child.cmdline()):
                return child
    return None


# Takes argv[1] bytes in 64 MiB pieces (bytearray writes every byte of a piece as it makes it) and lets go of
# them the moment the process argv[2] is gone (a zombie counts as gone), also while still taking them: the memory
# monitor ends that process before the last piece is made, and a retry then starts at once on an idle worker.
HOG = """
import sys, time
import psutil
size, victim = int(sys.argv[1]), int(sys.argv[2])

def gone():
    try:
        return psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

pieces, step = [], 64 * 2**20
while sum(map(len, pieces)) < size:
    if gone():
        sys.exit(0)
    pieces.append(bytearray(min(step, size - sum(map(len, pieces)))))
deadline = time.time() + 120
while time.time() < deadline and not gone():
    time.sleep(0.002)
"""


def trial_process(proc: subprocess.Popen, timeout: float = 300) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        found = find_trial(proc)
        if found is not None:
            return found
        time.sleep(0.2)
    pytest.fail("no trial process appeared")


def test_a_trial_killed_mid_run_is_failed_with_a_reason_and_the_study_goes_on(tmp_path, cache_dir, bench, spec_file):
    proc, url = start_study(spec_file, tmp_path, "killed-trial", trials=2)
    victim = trial_process(proc)
    wait_for_step(Store(url), "killed-trial", proc)
    victim.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    store = Store(url)
    rows = store.trials("killed-trial")
    # the killed attempt (1), its retry with the same setting (2), the second trial (3): nothing lost
    assert [r["number"] for r in rows] == [1, 2, 3], rows
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["number"] == 1, rows
    assert "worker process died" in failed[0]["error"] and "retrying" in failed[0]["error"], failed[0]["error"]
    assert rows[1]["params"] == rows[0]["params"]
    assert all(r["status"] in SCORED and r["metrics"] for r in rows[1:])
    # Optuna saw two settings, each once, both completed: the retry's result stands for the killed one
    states = [t.state for t in optuna.load_study(study_name="killed-trial/ga_gd@in_distribution", storage=url).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    assert store.study("killed-trial").status == "finished"


def test_a_trial_killed_by_rays_memory_monitor_is_failed_for_host_memory_retried_and_the_study_goes_on(
        tmp_path, cache_dir, bench, spec_file):
    """Another process on the node takes memory mid-trial: Ray's memory monitor (threshold set just above
    what the node uses now) kills the trial's worker. The attempt is stored failed for host memory, the same
    setting runs again, and the study finishes its budget."""
    margin = 5 * 2**30  # room for other processes on a shared machine to grow without a kill
    vm = psutil.virtual_memory()
    threshold = (vm.total - vm.available + margin) / vm.total
    env = {"RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100"}
    # every step runs (no stop at the target) and is evaluated, for more epochs than the other faults need:
    # touching the hog's gigabytes takes seconds on a busy machine, and the trial is still running when it is done
    proc, url = start_study(spec_file, tmp_path, "memory-monitor", trials=1, env=env, stop_at_target=False,
                            eval_every=1, epochs=(3, 4))
    victim = trial_process(proc)
    wait_for_step(Store(url), "memory-monitor", proc)
    vm = psutil.virtual_memory()
    hog_bytes = int(threshold * vm.total) - (vm.total - vm.available) + 2**30
    # the hog lets go of its memory within milliseconds of the victim's end, so it is back when the retry starts
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(hog_bytes), str(victim.pid)])
    try:
        victim.wait(timeout=120)  # the memory monitor ends it
    finally:
        hog.kill()
        hog.wait()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    store = Store(url)
    rows = store.trials("memory-monitor")
    assert [r["number"] for r in rows] == [1, 2], rows
    first = rows[0]
    assert first["status"] == "failed", rows
    assert "host memory" in first["error"] and "not GPU memory" in first["error"], first["error"]
    assert "concurrency" in first["error"] and "RAY_memory_usage_threshold" in first["error"], first["error"]
    assert "retrying" in first["error"], first["error"]
    assert rows[1]["params"] == first["params"]  # the retry runs the same setting
    assert all(r["status"] in SCORED and r["metrics"] for r in rows[1:]), \
        [(r["status"], r["error"]) for r in rows]
    assert store.study("memory-monitor").status == "finished"
    trials = optuna.load_study(study_name="memory-monitor/ga_gd@in_distribution", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]


def test_sigterm_stops_the_study_in_one_line_and_it_resumes(tmp_path, cache_dir, bench, spec_file):
    proc, url = start_study(spec_file, tmp_path, "sigterm", trials=1, merge=False)
    trial_process(proc)
    wait_for_step(Store(url), "sigterm", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr  # no crash dump (AbslFailureSignalHandler), no traceback, no progress bars
    assert lines[0].startswith("stopped (SIGTERM)") and f"tuner study resume sigterm --storage {url}" in lines[0]
    store = Store(url)
    assert store.study("sigterm").status == "interrupted"
    assert [r["status"] for r in store.trials("sigterm")] == ["interrupted"]
    resumed = subprocess.run([TUNER, "study", "resume", "sigterm", "--storage", url], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store.study("sigterm").status == "finished"
    assert [r["status"] for r in store.trials("sigterm")][0] == "interrupted"
    assert store.trials("sigterm")[1]["status"] in SCORED


def test_a_trial_out_of_memory_is_failed_with_advice_and_the_study_completes(tmp_path, cache_dir, bench, spec_file):
    # An oversized batch: its embeddings alone need 2**21 x 64 x 64 x 4 bytes = 32 GiB, more than this
    # machine has, so the allocator refuses at once, as CUDA does on a full GPU.
    batch = 2**21
    proc, url = start_study(spec_file, tmp_path, "oom-trial", trials=2, batch_size=batch)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        # On a machine with more memory than that, a cap on the trial process keeps the test honest.
        victim = find_trial(proc)
        if victim is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.rlimit(psutil.RLIMIT_AS, (victim.memory_info().vms + 4 * 2**30,) * 2)
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    store = Store(url)
    rows = store.trials("oom-trial")
    assert [r["status"] for r in rows] == ["failed", "failed"], rows
    for r in rows:
        assert f"out of memory with batch_size {batch}" in r["error"] and "grad_accum" in r["error"], r["error"]
        assert not r["metrics"]
    assert store.study("oom-trial").status == "finished"
    states = [t.state for t in optuna.load_study(study_name="oom-trial/ga_gd@in_distribution", storage=url).trials]
    assert states == [optuna.trial.TrialState.FAIL] * 2


def test_resources_no_node_has_are_refused_in_seconds_with_one_line(tmp_path, cache_dir, bench, spec_file):
    spec = spec_file(tmp_path, name="wants-gpu", methods=["ga"], resources={"gpus": 1})
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    started = time.monotonic()
    proc = subprocess.run([TUNER, "study", "run", str(spec), "--storage", url], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": ""})
    took = time.monotonic() - started
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: resources: a trial asks for 1 CPU and 1 GPU") and "0 GPU" in lines[0], lines
    assert took < 60, took  # not a silent wait for a GPU that never comes
    assert Store(url).study_names() == []  # refused before the study was stored


def test_waiting_for_resources_is_said_in_words():
    import ray

    from tuner.study.recorder import waiting_note

    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        assert waiting_note({"CPU": 1, "GPU": 1}) == "waiting for 1 GPU; the cluster has 0 free"
        assert waiting_note({"CPU": 4, "GPU": 0}) == "waiting for 4 CPU; the cluster has 1 free"
    finally:
        ray.shutdown()


def test_an_unexpected_driver_error_is_one_line_with_a_log_and_the_study_is_resumable(tmp_path, cache_dir, bench,
                                                                                      spec_file):
    """Someone renames one of the store's tables mid-study: the driver's next write fails (after the short
    patience set here), which no code path expects. One line, the traceback in a log beside the store, exit 1,
    and the study marked interrupted so that `tuner study resume` can continue it."""
    import sqlite3

    proc, url = start_study(spec_file, tmp_path, "driver-error", trials=1, merge=False,
                            env={"TUNER_STORE_RETRY_S": "2"})
    trial_process(proc)
    wait_for_step(Store(url), "driver-error", proc)
    with sqlite3.connect(tmp_path / "faults.db", timeout=60) as conn:
        conn.execute("ALTER TABLE tuner_curve RENAME TO tuner_curve_moved")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("database unavailable")]
    assert len(lines) == 1 and lines[0].startswith("error: unexpected "), stderr
    assert "OperationalError" in lines[0] and "no such table: tuner_curve" in lines[0], lines[0]
    assert f"resume with: tuner study resume driver-error --storage {url}" in lines[0], lines[0]
    log = Path(lines[0].rsplit("traceback: ", 1)[1])
    assert log.parent == tmp_path and log.is_file(), lines[0]
    assert "Traceback (most recent call last)" in log.read_text() and "tuner_curve" in log.read_text()
    with sqlite3.connect(tmp_path / "faults.db", timeout=60) as conn:
        conn.execute("ALTER TABLE tuner_curve_moved RENAME TO tuner_curve")
    store = Store(url)
    assert store.study("driver-error").status == "interrupted"
    assert [r["status"] for r in store.trials("driver-error")] == ["interrupted"]
