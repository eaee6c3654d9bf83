"""Studies end to end with the real Ray Tune, Optuna and database, on the micro testbed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from stored import check_every_trial_stored, check_study

from tuner.core.errors import TunerError
from tuner.store import Store
from tuner.study.orchestrator import run_study
from tuner.study.spec import load_spec

TUNER = str(Path(sys.executable).with_name("tuner"))


# two units, two trials each, two at once: what these studies share beyond the micro spec
STUDY = {"methods": ["ga", "ga_gd"], "budget": {"trials": 2}, "concurrency": 2,
         "sampler": {"name": "tpe", "n_startup_trials": 1}, "run": {"eval_every": 4}}


def test_a_study_on_postgresql_stores_every_trial_with_its_curve(tmp_path, local_ray, spec_file, pg_database):
    """On SQLite the same is checked on the `tuned` study of tests/test_recommend.py."""
    import ray

    spec, text = load_spec(spec_file(tmp_path, **STUDY, name="run-postgresql",
                                     per_method={"ga": {"lr": {"low": 1e29, "high": 1e30}}}))
    store = Store(pg_database)
    outcome = run_study(spec, text, store)
    assert ray.is_initialized()  # the module's Ray: a study shuts down only a Ray it started
    check_every_trial_stored(store, spec.name)  # GA at lr 1e29 diverges: recorded, not fatal
    assert outcome.pareto_sizes["ga_gd@in_distribution"] >= 1
    with pytest.raises(TunerError, match="already exists"):
        run_study(spec, text, store)


def test_killed_study_resumes_without_losing_or_repeating_trials(tmp_path, bench, cache_dir, spec_file):
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    path = spec_file(tmp_path, **(STUDY | {"name": "resumable", "methods": ["ga_gd"], "budget": {"trials": 2},
                                           "concurrency": 1}))
    env = {**os.environ, "TUNER_CACHE": str(cache_dir)}
    proc = subprocess.Popen([TUNER, "study", "run", str(path), "--storage", url], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(url)
    deadline = time.time() + 300
    finished_before: list[dict] = []
    while time.time() < deadline:
        try:
            finished_before = [r for r in store.trials("resumable") if r["status"] != "running"]
        except TunerError:
            finished_before = []
        if finished_before:
            break
        time.sleep(0.5)
    assert finished_before, "no trial finished within 300 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([TUNER, "study", "resume", "resumable", "--storage", url], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = check_study(store, "resumable", ["ga_gd@in_distribution"], 2)
    by_id = {r["id"]: r for r in rows}
    for before in finished_before:  # nothing finished was lost or changed
        assert by_id[before["id"]]["metrics"] == before["metrics"]
    assert store.study("resumable").status == "finished"
    ot = optuna.load_study(study_name="resumable/ga_gd@in_distribution", storage=Store(url).url)
    assert not [t for t in ot.trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.parametrize("body, message", [
    ("name: x\nmodel: testbed:micro\nmethods: [ga, nope]\n", "methods: Value error, unknown method 'nope'"),
    ("name: x\nmodel: testbed:micro\nsearch: {lr: {low: 0, high: 1}}\n", "search.lr: a log-scale range needs low > 0"),
    ("name: x\nmodel: testbed:micro\nsearch: {epochs: {low: 5, high: 2}}\n", "search.epochs: empty range: low 5 > high 2"),
    ("name: x\nmodel: testbed:micro\nmethods: [ga]\nsearch: {retain_weight: {low: 1, high: 2}}\n",
     "search.retain_weight: no method of this study (ga) takes 'retain_weight'; ga_gd, ga_kl, "),
    ("name: x\nmodel: testbed:micro\nmethods: [ga]\nper_method: {ga: {beta: {low: 1, high: 2}}}\n",
     "per_method.ga.beta: method 'ga' has no hyperparameter 'beta' (it takes: lr, epochs)"),
    ("name: x\nmodel: testbed:micro\nsearch: {epochs: {low: 1.5, high: 2}}\n", "epochs is searched in whole numbers"),
    ("name: x\nmodel: testbed:micro\nobjectives: [speed]\n", "objectives.0: Input should be"),
    ("name: x\nmodel: testbed:micro\nbudgett: {trials: 3}\n", "budgett: Extra inputs are not permitted"),
    ("name: x\nmodel: testbed:micro\nbudget: {trials: many}\n", "budget.trials: Input should be a valid integer"),
    ("name: x\nmodel: my/model\n", "data: required for a model that is not a testbed"),
    ("name: x\nmodel: my/model\ndata: {forget: {path: nofile.txt}, unseen: {path: nofile.txt}}\n",
     "data.forget.path: file not found: nofile.txt"),
    ("name: ../../etc\nmodel: testbed:micro\n", "name: Value error, use 1-100 letters"),
    ("name: x\nmodel: [unclosed\n", "malformed YAML"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TunerError) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_shipped_studies_validate(tmp_path):
    root = Path(__file__).resolve().parents[1] / "studies"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        spec, _ = load_spec(path)
        assert spec.name


def test_two_studies_write_one_sqlite_file_at_once(tmp_path, bench, cache_dir, spec_file):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "TUNER_CACHE": str(cache_dir)}
    procs = []
    for name in ("left", "right"):
        (tmp_path / name).mkdir()
        path = spec_file(tmp_path / name, **(STUDY | {"name": name, "methods": ["ga_gd"], "budget": {"trials": 1},
                                                      "concurrency": 1}))
        procs.append(subprocess.Popen([TUNER, "study", "run", str(path), "--storage", url], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert "finished; store: sqlite:///" in out
    store = Store(url)
    for name in ("left", "right"):
        check_study(store, name, ["ga_gd@in_distribution"], 1)
        assert store.study(name).status == "finished"
