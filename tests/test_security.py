"""The security promises of SECURITY.md, checked through the real `tuner` command and the real store.

The dashboard's promises (loopback binding, token, escaping of stored text) are tested in test_dashboards.py.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuner.core.errors import TunerError
from tuner.results import derived
from tuner.store import Store
from tuner.study.spec import StudySpec

TUNER = str(Path(sys.executable).with_name("tuner"))
ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret"
CLOSED = f"postgresql://user:{SECRET}@127.0.0.1:1/x"


def tuner(*args, cache_dir, cwd=None, **env):
    full = {**os.environ, "TUNER_CACHE": str(cache_dir), **env}
    full.pop("TUNER_STORAGE", None)
    return subprocess.run([TUNER, *map(str, args)], capture_output=True, text=True, env=full, timeout=600, cwd=cwd)


# the study these tests run or refuse: one GA trial of one epoch
SEC = {"name": "sec", "methods": ["ga"], "search": {"lr": {"low": 5e-4, "high": 1e-3}, "epochs": {"low": 1, "high": 1}},
       "run": {"eval_every": 4}}


# ---- configuration is data: YAML tags never construct objects --------------------------------------------------

@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/object:os.system"])
def test_python_tags_in_yaml_are_refused_not_run(tmp_path, cache_dir, tag):
    marker = tmp_path / "pwned"
    payload = f"{tag} [\"touch {marker}\"]"
    spec = tmp_path / "study.yaml"
    spec.write_text(f"name: x\nmodel: testbed:micro\nnotes: {payload}\n")
    proc = tuner("study", "validate", spec, cache_dir=cache_dir)
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr and "constructor" in proc.stderr, proc.stderr
    config = tmp_path / "config.yaml"
    config.write_text(f"config:\n  method: ga\n  lr: {payload}\n")
    proc = tuner("unlearn", "--model", "testbed:micro", "--config", config, "--out", tmp_path / "o", cache_dir=cache_dir)
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_stored_text_is_never_evaluated(tmp_path, cache_dir):
    """A store row holding code-like text (as if written by someone with database access) is shown as text."""
    marker = tmp_path / "pwned"
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    code = f"__import__('os').system('touch {marker}')"
    spec = StudySpec.model_validate({"name": "stored", "model": "testbed:micro", "notes": code})
    study_id = store.create_study("stored", "testbed:micro", 0, spec.model_dump(mode="json"),
                                  f"!!python/object/apply:os.system ['touch {marker}']\n", {"torch": code})
    search = store.ensure_search(study_id, "ga", "ga", None, "stored/ga", "tpe", 1, {})
    trial = store.start_trial(search, {"lr": 1e-3, "epochs": 1})
    store.finish_trial(trial, "failed", None, None, error=code)
    show = tuner("study", "show", "stored", "--storage", url, cache_dir=cache_dir)
    assert show.returncode == 0, show.stderr
    listing = tuner("study", "list", "--storage", url, cache_dir=cache_dir)
    assert listing.returncode == 0 and "stored" in listing.stdout
    report = tmp_path / "report.html"
    exported = tuner("dashboard", "export", "stored", "--storage", url, "-o", report, cache_dir=cache_dir)
    assert exported.returncode == 0, exported.stderr
    assert "__import__(&#x27;os&#x27;)" in report.read_text() or "__import__(&#39;os&#39;)" in report.read_text()
    assert not marker.exists()


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                   ("marshal", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                   ("torch", "load"), ("dill", "load"), ("dill", "loads"), ("shelve", "open")}


def test_no_code_is_evaluated_or_unpickled_in_the_sources():
    """A source audit of tuner/ and dashboards/ (the behaviour is tested above): no eval/exec, no unpickling
    of anything, YAML only through safe_load, no subprocess with a shell."""
    found = []
    files = sorted([*ROOT.joinpath("tuner").rglob("*.py"), *ROOT.joinpath("dashboards").rglob("*.py")])
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in FORBIDDEN_CALLS:
                    found.append(f"{path}:{node.lineno} {fn.id}()")
                if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) \
                        and (fn.value.id, fn.attr) in FORBIDDEN_ATTRS:
                    found.append(f"{path}:{node.lineno} {fn.value.id}.{fn.attr}()")
                if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    found.append(f"{path}:{node.lineno} shell=")
            if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "marshal", "shelve", "dill"}:
                found.append(f"{path}:{node.lineno} from {node.module} import")
            if isinstance(node, ast.Import) and any(a.name in {"pickle", "marshal", "shelve", "dill"}
                                                    for a in node.names):
                found.append(f"{path}:{node.lineno} import pickle-like")
    assert found == []
    # the audit itself can fail: it finds what it looks for
    probe = ast.parse("import pickle\nyaml.load(x)\neval('1')\n")
    assert sum(isinstance(n, ast.Call | ast.Import) for n in ast.walk(probe)) == 3


# ---- trust_remote_code -------------------------------------------------------------------------------------------

@pytest.fixture
def remote_code_model(tmp_path, bench):
    """A local model directory (with a working tokenizer) whose config asks for its own Python code; the code
    leaves a marker when run."""
    model = tmp_path / "remote-code-model"
    bench.tokenizer.save_pretrained(model)
    marker = tmp_path / "remote-code-ran"
    (model / "config.json").write_text('{"model_type": "customgpt", "vocab_size": 10, "auto_map": {'
                                       '"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomLM"}}')
    (model / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                     "from transformers import PretrainedConfig\n"
                                     "class CustomConfig(PretrainedConfig):\n    model_type = 'customgpt'\n")
    return model, marker


def test_remote_code_is_off_unless_asked_for(tmp_path, cache_dir, bench, remote_code_model, spec_file, store_file):
    model, marker = remote_code_model
    assert StudySpec.model_validate({"name": "x", "model": "testbed:micro"}).trust_remote_code is False
    hf = {"HF_HOME": str(tmp_path / "hf")}
    data = bench.source.testbed_root / "data"
    proc = tuner("unlearn", "--model", model, "--method", "ga", "--lr", "1e-3", "--forget", data / "forget",
                 "--unseen", data / "unseen", "--block-size", "32", "--out", tmp_path / "o", cache_dir=cache_dir, **hf)
    assert proc.returncode == 2 and "could not be loaded" in proc.stderr and "custom code" in proc.stderr
    assert "warning" not in proc.stderr
    store = store_file
    spec = spec_file(tmp_path, **SEC, model=str(model), data={"forget": {"path": str(data / "forget")},
                                                               "unseen": {"path": str(data / "unseen")}, "block_size": 32})
    proc = tuner("study", "run", spec, "--storage", store, cache_dir=cache_dir, **hf)
    assert proc.returncode == 2 and "custom code" in proc.stderr, proc.stderr
    assert not marker.exists() and Store(store).study_names() == []
    # asked for: a warning, and `study validate` still does not run the model's code
    spec = spec_file(tmp_path, **SEC, model=str(model), trust_remote_code=True,
                     data={"forget": {"path": str(data / "forget")}, "unseen": {"path": str(data / "unseen")}})
    proc = tuner("study", "validate", spec, cache_dir=cache_dir, **hf)
    assert proc.returncode == 0, proc.stderr
    assert "warning: trust_remote_code: true runs Python code shipped with model" in proc.stderr
    assert not marker.exists()


# ---- names cannot become paths ------------------------------------------------------------------------------------

def test_study_names_are_checked_wherever_a_study_is_created(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    for bad in ("../escape", "a/b", "ok\n", "", ".hidden", "x" * 101, "name with space"):
        with pytest.raises(TunerError, match="use 1-100 letters"):
            store.create_study(bad, "m", 0, {}, "", {})
        with pytest.raises(TunerError, match="name: Value error"):
            from tuner.study.spec import validate_spec

            validate_spec({"name": bad, "model": "testbed:micro"}, "spec")
    assert store.study_names() == []


def test_exports_write_only_where_told(tmp_path, cache_dir, spec_file):
    """No output name is derived from a study or method name: without -o, `export` writes to stdout only and
    `dashboard export` refuses; a path-like --method is just an unknown method."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    spec = StudySpec.model_validate({"name": "exp", "model": "testbed:micro", "methods": ["ga"]})
    study_id = store.create_study("exp", spec.model, 0, spec.model_dump(mode="json"), "", {})
    search = store.ensure_search(study_id, "ga", "ga", None, "exp/ga", "tpe", 1, {})
    trial = store.start_trial(search, {"lr": 1e-3, "epochs": 1})
    store.finish_trial(trial, "completed", {"forget_gap": 0.0, "utility_drop": 0.1},
                       {"metrics": {"forget_gap": 0.0, "utility_drop": 0.1, "mia_auc": 0.5},
                        "config": {"method": "ga", "lr": 1e-3}})
    derived.refresh(store, "exp")  # as the study driver does when a trial finishes
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = tuner("export", "exp", "--storage", url, cache_dir=cache_dir, cwd=work)
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["study"] == "exp"
    proc = tuner("export", "exp", "--method", "../../escape", "--storage", url, cache_dir=cache_dir, cwd=work)
    assert proc.returncode == 2 and "has no method '../../escape'" in proc.stderr
    proc = tuner("dashboard", "export", "exp", "--storage", url, cache_dir=cache_dir, cwd=work)
    assert proc.returncode == 2 and "-o/--output" in proc.stderr
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    proc = tuner("study", "validate", spec_file(tmp_path, **(SEC | {"methods": ["../../x"]})),
                 cache_dir=cache_dir)
    assert proc.returncode == 2 and "unknown method '../../x'" in proc.stderr


# ---- database credentials --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboards_never_create_a_store(tmp_path, cache_dir):
    """The dashboards only read: pointed at a store that is not there, they say so and leave nothing behind."""
    missing = tmp_path / "typo.db"
    for args in (["dashboard", "--storage", f"sqlite:///{missing}", "--port", "1"],
                 ["dashboard", "export", "any", "--storage", f"sqlite:///{missing}", "-o", tmp_path / "r.html"]):
        out = tuner(*args, cache_dir=cache_dir)
        assert out.returncode == 2 and "no store at" in out.stderr, out.stderr
        assert not missing.exists() and not (tmp_path / "r.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_password_in_the_storage_url_never_reaches_the_output(tmp_path, cache_dir, spec_file):
    spec = spec_file(tmp_path, **SEC)
    commands = [("study", "run", spec, "--storage", CLOSED), ("study", "resume", "sec", "--storage", CLOSED),
                ("study", "list", "--storage", CLOSED), ("study", "show", "sec", "--storage", CLOSED),
                ("export", "sec", "--storage", CLOSED), ("dashboard", "export", "sec", "-o", tmp_path / "r.html",
                                                         "--storage", CLOSED),
                ("dashboard", "--storage", CLOSED, "--port", _free_port())]
    spec_with_url = spec_file(tmp_path, **SEC, storage=CLOSED)
    commands.append(("study", "run", spec_with_url))
    for args in commands:
        proc = tuner(*args, cache_dir=cache_dir)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "unreachable" in proc.stderr and "user:***@127.0.0.1:1" in proc.stderr, (args, proc.stderr)
        assert SECRET not in proc.stdout + proc.stderr, args


def test_a_study_run_with_a_password_shows_and_stores_none(tmp_path, cache_dir, bench, pg_database, spec_file):
    """A whole study against PostgreSQL with a password in the URL (the test server trusts any password):
    its output (progress, tables, Ray and Optuna messages) and the stored spec keep the password out."""
    url = re.sub(r"://([^@/:]+)@", rf"://\1:{SECRET}@", pg_database, count=1)
    assert SECRET in url
    spec = spec_file(tmp_path, **SEC, storage=url)  # in the file, too: stored text is masked
    proc = tuner("study", "run", spec, "--storage", url, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished; store: postgresql+psycopg://" in proc.stdout and ":***@" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    study = Store(pg_database).study("sec")
    assert SECRET not in study.spec_text and SECRET not in str(study.spec)
    assert ":***@" in study.spec["storage"]
    failed = tuner("export", "nope", "--storage", url, cache_dir=cache_dir)  # an error naming the store
    assert failed.returncode == 2 and "no study named 'nope'" in failed.stderr and SECRET not in failed.stderr
