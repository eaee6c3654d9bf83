"""Progress in logs: with standard output redirected (nohup, Slurm, CI), `tuner unlearn` and `tuner study run`
print plain `key=value` progress lines while they run, not only their results at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.store import Store

TUNER = str(Path(sys.executable).with_name("tuner"))
FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')


def run_piped(*args: object, cache_dir: Path) -> subprocess.CompletedProcess:
    """The console script with stdout and stderr to pipes, as under nohup or a batch system."""
    env = {**os.environ, "TUNER_CACHE": str(cache_dir), "RAY_ADDRESS": ""}
    return subprocess.run([TUNER, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def progress_lines(stdout: str, prefix: str) -> list[dict[str, str]]:
    """The progress lines of `stdout` that start with `prefix`, each as its fields."""
    return [{k: v.strip('"') for k, v in FIELD.findall(line)} for line in stdout.splitlines()
            if line.startswith(prefix)]


def figure_of(field: str) -> tuple[float, float | None]:
    """A progress figure and its standard error: "+0.1234" or "+0.1234 ± 0.0056 (subsample estimate)"."""
    value, _, rest = field.partition(" ± ")
    return float(value), float(rest.split()[0]) if rest else None


def test_a_redirected_unlearn_prints_progress_lines(tmp_path, cache_dir, bench):
    out = tmp_path / "run"
    proc = run_piped("unlearn", "--model", "testbed:micro", "--method", "ga_gd", "--lr", "1e-3", "--max-steps", "4",
                     "--eval-every", "1", "--eval-utility-every", "2", "--no-stop-at-target", "--progress-every", "1",
                     "--out", out, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout
    lines = progress_lines(proc.stdout, "[unlearn ga_gd]")
    stepped = [f for f in lines if "step" in f]
    assert len(stepped) >= 2
    elapsed = [int(f["elapsed"].removesuffix("s")) for f in lines]
    assert elapsed == sorted(elapsed)
    assert {int(f["step"].split("/")[0]) for f in stepped} >= {0, 4}
    assert all(f["step"].split("/")[1] == "4" for f in stepped)
    assert lines[-1]["phase"] == "done"
    # each evaluation's figures are the run's own curve; a point that did not score the retain set says so
    curve = {p["step"]: p for p in json.loads((out / "metrics.json").read_text())["curve"]}
    evaluated = {int(f["eval_step"]): f for f in lines if "eval_step" in f}
    assert set(evaluated) == set(curve) == {0, 1, 2, 3, 4}
    for step, f in evaluated.items():
        gap, gap_se = figure_of(f["forget_gap"])
        assert gap == pytest.approx(curve[step]["forget_gap"], abs=1e-4)
        assert gap_se == pytest.approx(curve[step].get("forget_gap_se"), abs=1e-4)
        if "retain_nll" in curve[step]:
            drop, drop_se = figure_of(f["utility_drop"])
            assert drop == pytest.approx(curve[step]["retain_nll"] - curve[0]["retain_nll"], abs=1e-4)
            assert drop_se == pytest.approx(curve[step].get("utility_drop_se"), abs=1e-4)
        else:
            assert f["utility_drop"] == "not measured"
    # the default screening estimates mid-run points on subsamples, and the line says so
    assert evaluated[2]["forget_gap"].endswith("(subsample estimate)")
    assert evaluated[1]["utility_drop"] == "not measured" and evaluated[2]["utility_drop"] != "not measured"


def test_a_redirected_study_run_prints_progress_lines(tmp_path, cache_dir, bench, spec_file):
    spec = spec_file(tmp_path, budget={"trials": 2})
    url = f"sqlite:///{tmp_path / 'store.db'}"
    proc = run_piped("study", "run", spec, "--storage", url, "--progress-every", "1", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr
    raw = [line for line in proc.stdout.splitlines() if line.startswith("[study micro]")]
    assert not any("\x1b[" in line for line in raw)
    lines = progress_lines(proc.stdout, "[study micro]")
    assert len(lines) >= 2
    assert {f["unit"] for f in lines} == {"ga_gd@in_distribution"}
    for f in lines:
        done, budget = map(int, f["finished"].split("/"))
        assert budget == 2 and 0 <= done <= 2 and int(f["running"]) >= 0 and int(f["failed"]) >= 0
        assert f["elapsed"].endswith("s") and f["elapsed"][:-1].isdigit()
        if f["best_gap"] != "none yet":
            float(f["best_gap"])
    assert lines[0]["best_gap"] == "none yet"
    last = lines[-1]
    assert last["finished"] == "2/2" and last["running"] == "0" and last["failed"] == "0"
    trials = Store(url).trials("micro")
    closest = min((t["metrics"]["forget_gap"] for t in trials), key=abs)
    assert float(last["best_gap"]) == pytest.approx(closest, abs=1e-4)
    assert any(f["running"] == "1" for f in lines)  # a line while a trial ran, not only at the end
