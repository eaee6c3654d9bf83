"""Bad input, as a user meets it through the real `tuner` command: one line on stderr naming the field or the
file, exit code 2, and nothing written (no study row, no export file, no output folder, no new store).

Spec-field messages themselves are checked in test_study.py::test_spec_errors_name_the_file_and_field, `tuner
unlearn` flags in test_cli.py::test_bad_settings_exit_2_with_one_line, data files in
test_data.py::test_bad_forget_sets_name_the_set_and_file; here: the same mistakes end to end, the cases they
leave out, and a property-based check of the spec validator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuner.core.errors import TunerError
from tuner.results import derived
from tuner.store import Store
from tuner.study.spec import StudySpec, load_spec, validate_spec

TUNER = str(Path(sys.executable).with_name("tuner"))
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())


def tuner(*args, cache_dir, cwd=None):
    env = {**os.environ, "TUNER_CACHE": str(cache_dir)}
    env.pop("TUNER_STORAGE", None)
    return subprocess.run([TUNER, *map(str, args)], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def refused(proc, *needles):
    """Exit 2, exactly one line on stderr (the error), no traceback, every needle in it."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_study_rows(url):
    assert Store(url).study_names() == []


# ---- study specs through `tuner study run` ------------------------------------------------------------------

SPEC_CASES = {
    "malformed_yaml": ("name: x\nmodel: [testbed:micro\n", ["malformed YAML"]),
    "unknown_key": ("name: x\nmodel: testbed:micro\nconcurency: 2\n", ["concurency: Extra inputs are not permitted"]),
    "nested_unknown_key": ("name: x\nmodel: testbed:micro\nrun: {batchsize: 8}\n", ["run.batchsize: Extra inputs"]),
    "wrong_type": ("name: x\nmodel: testbed:micro\nconcurrency: two\n", ["concurrency: Input should be a valid integer"]),
    "list_for_mapping": ("name: x\nmodel: testbed:micro\nsearch: [1, 2]\n", ["search: Input should be a valid"]),
    "negative_budget": ("name: x\nmodel: testbed:micro\nbudget: {trials: -3}\n",
                        ["budget.trials: Input should be greater"]),
    "gpus_negative": ("name: x\nmodel: testbed:micro\nresources: {gpus: -1}\n", ["resources.gpus"]),
    "nan_rate": ("name: x\nmodel: testbed:micro\nsearch: {lr: {low: .nan, high: 1.0e-3}}\n",
                 ["search.lr.low: Input should be a finite number"]),
    "infinite_tolerance": ("name: x\nmodel: testbed:micro\ntarget: {gap_tolerance: .inf}\n",
                           ["target.gap_tolerance: Input should be a finite number"]),
    "missing_model": ("name: x\nmethods: [ga]\n", ["model: Field required"]),
    "not_a_mapping": ("- name: x\n", ["a study file must be a YAML mapping"]),
    "empty_file": ("", ["a study file must be a YAML mapping"]),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_bad_specs_are_refused_before_the_study_is_stored(tmp_path, cache_dir, store_file, case):
    body, needles = SPEC_CASES[case]
    path = tmp_path / "study.yaml"
    path.write_text(body, encoding="utf-8")
    refused(tuner("study", "run", path, "--storage", store_file, cache_dir=cache_dir), str(path), *needles)
    no_study_rows(store_file)


def test_non_utf8_and_missing_spec_files(tmp_path, cache_dir, store_file):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: café\nmodel: testbed:micro\n".encode("latin-1"))
    refused(tuner("study", "run", latin1, "--storage", store_file, cache_dir=cache_dir), str(latin1), "not UTF-8")
    refused(tuner("study", "validate", latin1, cache_dir=cache_dir), str(latin1), "not UTF-8")
    missing = tmp_path / "nope.yaml"
    refused(tuner("study", "run", missing, "--storage", store_file, cache_dir=cache_dir), "study file not found")
    no_study_rows(store_file)


@pytest.mark.parametrize("flags, needle", [
    (["--name", "../../etc/passwd"], "name: Value error, use 1-100 letters"),
    (["--name", "ok\nerror: forged second line"], "name: Value error"),  # `$` would match before the newline
    (["--name", "x" * 101], "name: Value error"),
    (["--trials", "0"], "--trials must be at least 1"),
])
def test_bad_flags_of_study_run(tmp_path, cache_dir, store_file, flags, needle, spec_file):
    path = spec_file(tmp_path, methods=["ga"])
    refused(tuner("study", "run", path, "--storage", store_file, *flags, cache_dir=cache_dir), needle)
    no_study_rows(store_file)


# ---- data files ---------------------------------------------------------------------------------------------

def write_data(tmp_path, case: str) -> Path:
    if case == "empty":
        path = tmp_path / "forget.txt"
        path.write_text("")
    elif case == "not_utf8":
        path = tmp_path / "forget.txt"
        path.write_bytes(b"def f():\n    return 'caf\xe9'\n" * 50)
    elif case == "bad_jsonl":
        path = tmp_path / "forget.jsonl"
        path.write_text('{"text": "fine"}\n{"text": broken\n')
    else:  # a directory with nothing in it
        path = tmp_path / "forget-dir"
        path.mkdir()
    return path


DATA_MESSAGES = {"empty": "contains no text", "not_utf8": "is not UTF-8 text (byte",
                 "bad_jsonl": "line 2 is not valid JSON", "empty_dir": "has no files matching"}


def unseen_file(tmp_path, bench) -> Path:
    root = bench.source.testbed_root / "data" / "unseen"
    path = tmp_path / "unseen.txt"
    path.write_text((root / sorted(os.listdir(root))[0]).read_text())
    return path


@pytest.mark.parametrize("case", sorted(DATA_MESSAGES))
def test_unreadable_data_stops_study_run_before_the_study_is_stored(tmp_path, cache_dir, bench, store_file, case,
                                                                    spec_file):
    forget = write_data(tmp_path, case)
    path = spec_file(tmp_path, methods=["ga"], data={"forget": {"path": str(forget)},
                                                     "unseen": {"path": str(unseen_file(tmp_path, bench))},
                                                     "block_size": 32})
    line = refused(tuner("study", "run", path, "--storage", store_file, cache_dir=cache_dir),
                   str(path), "data.forget", DATA_MESSAGES[case])
    assert str(forget) in line
    no_study_rows(store_file)
    if case == "not_utf8":  # `study validate` reads the data too
        refused(tuner("study", "validate", path, cache_dir=cache_dir), "data.forget", DATA_MESSAGES[case])


@pytest.mark.parametrize("case", ["empty", "not_utf8"])
def test_unreadable_data_stops_unlearn_without_an_output_folder(tmp_path, cache_dir, bench, case):
    forget = write_data(tmp_path, case)
    out = tmp_path / "out"
    refused(tuner("unlearn", "--model", "testbed:micro", "--method", "ga", "--lr", "1e-3", "--forget", forget,
                  "--unseen", unseen_file(tmp_path, bench), "--block-size", "32", "--out", out, cache_dir=cache_dir),
            "forget", str(forget), DATA_MESSAGES[case])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unlearn-")]  # no staging folder left


# ---- a tokenizer that does not fit the model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mismatched_model(tmp_path_factory, bench):
    """A saved GPT-2 whose embedding table is smaller than its tokenizer: ids past the table would crash mid-run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("mismatch") / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bench.tokenizer) - 50, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    bench.tokenizer.save_pretrained(path)
    return path


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, cache_dir, bench, store_file, mismatched_model,
                                                         spec_file):
    out = tmp_path / "out"
    forget = tmp_path / "forget.txt"
    forget.write_text((bench.source.testbed_root / "data" / "forget").joinpath(
        sorted(os.listdir(bench.source.testbed_root / "data" / "forget"))[0]).read_text())
    unseen = unseen_file(tmp_path, bench)
    refused(tuner("unlearn", "--model", mismatched_model, "--method", "ga", "--lr", "1e-3", "--forget", forget,
                  "--unseen", unseen, "--block-size", "32", "--out", out, cache_dir=cache_dir),
            "do not belong together", f"tokenizer has {len(bench.tokenizer)} tokens")
    assert not out.exists()
    data = {"forget": {"path": str(forget)}, "unseen": {"path": str(unseen)}, "block_size": 32}
    path = spec_file(tmp_path, methods=["ga"], model=str(mismatched_model), data=data)
    refused(tuner("study", "run", path, "--storage", store_file, cache_dir=cache_dir), str(path),
            "do not belong together")
    path = spec_file(tmp_path, methods=["ga"], model=bench.source.path, data={**data, "block_size": 4096})
    refused(tuner("study", "run", path, "--storage", store_file, cache_dir=cache_dir), str(path),
            "data.block_size 4096 is longer than the model's context")
    no_study_rows(store_file)


# ---- storage ------------------------------------------------------------------------------------------------

def test_unusable_sqlite_locations_are_refused_and_not_created(tmp_path, cache_dir, spec_file):
    path = spec_file(tmp_path, methods=["ga"])
    missing = tmp_path / "no-such-folder"
    refused(tuner("study", "run", path, "--storage", f"sqlite:///{missing / 'x.db'}", cache_dir=cache_dir),
            f"folder {missing}", "does not exist")
    assert not missing.exists()
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a folder")
    refused(tuner("study", "run", path, "--storage", f"sqlite:///{a_file / 'x.db'}", cache_dir=cache_dir),
            "does not exist")
    # commands that only read never create a store: a mistyped --storage leaves no new file behind
    typo = tmp_path / "typo.db"
    for args in (["study", "list"], ["study", "show", "x"], ["study", "resume", "x"], ["export", "x"]):
        refused(tuner(*args, "--storage", f"sqlite:///{typo}", cache_dir=cache_dir), "no store at", str(typo))
    assert not typo.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_sqlite_folder(tmp_path, cache_dir, spec_file):
    path = spec_file(tmp_path, methods=["ga"])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(tuner("study", "run", path, "--storage", f"sqlite:///{locked / 'x.db'}", cache_dir=cache_dir),
                "not writable")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_a_database_without_a_store_is_not_written_by_reading_commands(cache_dir, pg_database):
    import psycopg

    refused(tuner("export", "x", "--storage", pg_database, cache_dir=cache_dir), "no store at", "no tuner tables")
    with psycopg.connect(pg_database.replace("postgresql+psycopg://", "postgresql://")) as conn:
        tables = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables.fetchall() == []


# ---- a study name that is taken -----------------------------------------------------------------------------

def test_an_existing_study_name_points_at_resume_and_is_left_alone(tmp_path, cache_dir, store_file, micro_spec,
                                                                   spec_file):
    store = Store(store_file)
    spec = StudySpec.model_validate(micro_spec(methods=["ga"], name="taken"))
    store.create_study("taken", spec.model, 0, spec.model_dump(mode="json"), "name: taken\n", {"v": "1"})
    before = store.study("taken")
    path = spec_file(tmp_path, methods=["ga"], name="other")
    refused(tuner("study", "run", path, "--name", "taken", "--storage", store_file, cache_dir=cache_dir),
            "a study named 'taken' already exists", "tuner study resume taken")
    after = store.study("taken")
    assert store.study_names() == ["taken"]
    assert (after.status, after.spec_text, after.updated_at) == (before.status, before.spec_text, before.updated_at)
    assert store.trials("taken") == []


def test_racing_creators_of_one_name_get_the_same_error(store_url):
    """The second creator checks for the name before the first commits, then collides on the unique index:
    a TunerError pointing at resume, not an IntegrityError traceback."""
    from sqlalchemy import insert

    from tuner.store.schema import Study

    first, second = Store(store_url), Store(store_url)
    outcome: dict[str, BaseException | int] = {}

    def create():
        try:
            outcome["result"] = second.create_study("race", "m", 0, {}, "", {})
        except BaseException as err:  # noqa: BLE001 - the test inspects whatever came out
            outcome["result"] = err

    with first.engine.begin() as conn:  # the winner's insert, not yet committed
        conn.execute(insert(Study).values(name="race", model="m", seed=0, spec={}, spec_text="", status="created"))
        racer = threading.Thread(target=create)
        racer.start()
        time.sleep(1.5)  # the racer has looked (found nothing) and now waits on the winner's lock
        assert racer.is_alive()
    racer.join(timeout=60)
    err = outcome["result"]
    assert isinstance(err, TunerError), repr(err)
    assert "a study named 'race' already exists" in str(err) and "tuner study resume race" in str(err)
    assert first.study_names() == ["race"]


# ---- export --------------------------------------------------------------------------------------------------

@pytest.fixture
def exportable(tmp_path, micro_spec):
    """A stored study with one finished trial in the target band (written through the store's API)."""
    url = f"sqlite:///{tmp_path / 'export.db'}"
    store = Store(url)
    spec = StudySpec.model_validate(micro_spec(methods=["ga"], name="exp"))
    study_id = store.create_study("exp", spec.model, 0, spec.model_dump(mode="json"), "", {})
    search = store.ensure_search(study_id, "ga", "ga", None, "exp/ga", "tpe", 1, {})
    trial = store.start_trial(search, {"lr": 1e-3, "epochs": 1})
    metrics = {"forget_gap": 0.01, "utility_drop": 0.1, "mia_auc": 0.5, "forget_nll": 5.0, "unseen_nll": 5.0}
    store.finish_trial(trial, "completed", {"forget_gap": 0.01, "utility_drop": 0.1},
                       {"metrics": metrics, "config": {"method": "ga", "lr": 1e-3, "epochs": 1}})
    derived.refresh(store, "exp")  # as the study driver does when a trial finishes
    return url


def test_export_to_unusable_paths_writes_nothing(tmp_path, cache_dir, exportable):
    folder = tmp_path / "already-a-folder"
    folder.mkdir()
    refused(tuner("export", "exp", "--storage", exportable, "-o", folder, cache_dir=cache_dir), "is a directory")
    assert list(folder.iterdir()) == []
    a_file = tmp_path / "plain-file"
    a_file.write_text("keep")
    refused(tuner("export", "exp", "--storage", exportable, "-o", a_file / "r.yaml", cache_dir=cache_dir),
            "does not exist")
    assert a_file.read_text() == "keep"
    ok = tuner("export", "exp", "--storage", exportable, "-o", tmp_path / "r.yaml", cache_dir=cache_dir)
    assert ok.returncode == 0, ok.stderr  # the same study exports fine to a usable path
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["config"]["method"] == "ga"


# ---- property: the spec validator raises nothing but TunerError ------------------------------------------------

BASE = {**QUICKSTART, "methods": ["ga", "ga_gd", "ga_kl"], "retain_sources": ["in_distribution", "general"],
        "per_method": {"ga": {"lr": {"low": 1e-4, "high": 1e-3}}}, "run": {**QUICKSTART["run"], "device": "cpu"},
        # validation only checks that data files exist: any existing file will do
        "data": {"forget": {"path": str(ROOT / "studies" / "quickstart.yaml")},
                 "unseen": {"path": str(ROOT / "studies"), "pattern": "*.yaml"},
                 "general": {"path": str(ROOT / "README.md"), "format": "text"}, "block_size": 64}}

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=20) | st.sampled_from(["", "..", "/", "~", "ga", "tpe", "0", "-1", "1e309", "\x00",
                                                     "é", "\u202e", "\ud7ff", "testbed:micro", "testbed:", "\n"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3), max_leaves=8)


def _paths(doc, prefix=()):
    """Every (path) into nested dicts and lists of `doc`, the root included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def near_valid(draw):
    """The quick-start spec with 1-3 mutations: a value replaced (wrong type, negative, odd unicode, NaN...),
    a key removed, or an unknown key added."""
    import copy

    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "delete", "add", "negate"]))
        if not path or op == "add":
            target = doc if not path else parent[path[-1]]
            if isinstance(target, dict):
                target[draw(st.text(max_size=12))] = draw(values)
            continue
        if op == "delete":
            del parent[path[-1]]
        elif op == "negate" and isinstance(parent[path[-1]], int | float) and not isinstance(parent[path[-1]], bool):
            parent[path[-1]] = -parent[path[-1]]
        else:
            parent[path[-1]] = draw(values)
    return doc


ODD_TEXT = (st.text(max_size=30) | st.text(min_size=300, max_size=5000)
            | st.sampled_from(["", " ", "..", "../..", "/", "~", "~nobody/x", "\x00", "a\x00b", "x" * 4096, "\n",
                               "é", "\u202e", "\ufeff", "💥", "testbed:", "testbed:micro@x", "C:\\x", "*", "**/[",
                               "postgresql://u:p@h/db"]))


@st.composite
def odd_strings(draw):
    """The quick-start spec with one of its string values (name, model, notes, data paths and patterns, device,
    a method, the sampler...) replaced by odd unicode, NUL bytes, very long or path-like text."""
    import copy

    doc = copy.deepcopy(BASE)
    strings = [p for p in _paths(doc) if p and isinstance(_get(doc, p), str)]
    path = draw(st.sampled_from(strings))
    _get(doc, path[:-1])[path[-1]] = draw(ODD_TEXT)
    return doc


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def check_validator(doc) -> StudySpec | None:
    try:
        spec = validate_spec(doc, "generated.yaml")
    except TunerError as err:
        message = str(err)
        assert message.startswith("generated.yaml: ") and "\n" not in message and "\r" not in message
        return None
    assert isinstance(spec, StudySpec)
    again = validate_spec(spec.model_dump(mode="json"), "round trip")  # what the store keeps validates again
    assert again == spec
    return spec


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_quickstart_base_is_valid():
    assert check_validator(BASE) is not None


@FAST
@given(near_valid())
def test_validator_on_near_valid_specs(doc):
    check_validator(doc)


@FAST
@given(odd_strings())
def test_validator_on_odd_strings(doc):
    check_validator(doc)


@FAST
@given(values)
def test_validator_on_arbitrary_structures(doc):
    check_validator(doc)


@FAST
@given(st.integers(1, 10_000), st.floats(1e-9, 1.0), st.floats(1.0, 1e3), st.integers(1, 50),
       st.lists(st.sampled_from(["ga", "ga_gd", "ga_kl", "random_label", "adversarial", "retain_finetune",
                                 "random_model_label"]), min_size=1, max_size=7),
       st.sampled_from(["tpe", "nsga2", "nsga3", "random", "qmc"]),
       st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True))
def test_valid_specs_are_accepted(trials, low, factor, epochs, chosen, sampler, name):
    doc = {**BASE, "name": name, "budget": {"trials": trials}, "methods": chosen, "per_method": {},
           "search": {"lr": {"low": low, "high": low * factor}, "epochs": {"low": 1, "high": epochs}},
           "sampler": {"name": sampler}}
    spec = check_validator(doc)
    assert spec is not None and spec.name == name and spec.budget.trials == trials


@FAST
@given(st.one_of(values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
                 near_valid().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                 st.text(max_size=200),
                 st.binary(max_size=200)))
def test_yaml_loader_only_raises_tuner_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generated.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        try:
            spec, text = load_spec(path)
        except TunerError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err)
        else:
            assert isinstance(spec, StudySpec) and isinstance(text, str)


# ---- property: every `tuner` subcommand, random arguments and files, never a traceback -----------------------

# Each command with what its arguments may be drawn from. Kinds: "file" (one of the random files below),
# "store" (a storage URL: broken ones, or the one real store), "bad_store" (broken ones only: commands that
# would start real work with a usable store), "text" (odd strings), or a list of literal choices. Work
# that would run for minutes is left out by construction: `study run`/`resume` only get unusable stores,
# `unlearn` only models that do not exist, `testbed` only the cached micro testbed, `dashboard` (the server)
# only ports it cannot bind.
CLI_COMMANDS: dict[tuple[str, ...], tuple[list, dict]] = {
    ("methods",): ([], {}),
    ("testbed", "build"): ([], {"--size": ["micro"], "--seed": ["0"]}),
    ("testbed", "show"): ([], {"--size": ["micro"], "--seed": ["0"]}),
    ("unlearn",): ([], {"--model": "file", "--out": "file", "--overwrite": None, "--config": "file",
                        "--method": "text", "--lr": "text", "--epochs": "text", "--max-steps": "text",
                        "--retain-weight": "text", "--retain-source": "text", "--batch-size": "text",
                        "--forget": "file", "--unseen": "file", "--block-size": "text", "--device": "text",
                        "--dtype": "text", "--text-field": "text", "--trust-remote-code": None}),
    ("study", "run"): (["file"], {"--storage": "bad_store", "--name": "text", "--trials": "text",
                                  "--address": "text"}),
    ("study", "resume"): (["text"], {"--storage": "bad_store", "--address": "text"}),
    ("study", "validate"): (["file"], {}),
    ("study", "list"): ([], {"--storage": "store"}),
    ("study", "show"): (["text"], {"--storage": "store", "--json": None}),
    ("export",): (["text"], {"--method": "text", "--format": ["yaml", "json", "xml"], "-o": "file",
                             "--storage": "store"}),
    ("dashboard",): ([], {"--storage": "store", "--host": "text", "--port": ["0", "-1", "65536", "99999", "x"],
                          "--token": "text"}),
    ("dashboard", "export"): (["text"], {"-o": "file", "--storage": "store", "--abs-gap": None}),
}
REQUIRED = {("unlearn",): ["--model", "--out"], ("dashboard",): ["--port"], ("dashboard", "export"): ["-o"]}
ODD_ARGS = ["", "-", "--", "x", "stored", "ga", "nan", "-1", "0", "1e309", "\x00", "a\nb", "é", "\u202e", "💥",
            "x" * 300, "/nonexistent/dir/x", "~nobody/x", "postgresql://u:s3cret@127.0.0.1:1/x"]


def test_the_property_test_covers_every_subcommand(capsys):
    import re

    from tuner.cli import build_parser

    found: set[tuple[str, ...]] = set()
    pending: list[tuple[str, ...]] = [()]
    while pending:
        path = pending.pop()
        with pytest.raises(SystemExit):
            build_parser().parse_args([*path, "--help"])
        # the subcommands are listed as the positional argument `{a,b,...}` (options' choices follow a flag)
        choices = re.search(r"^\s+\{([\w,-]+)\}", capsys.readouterr().out, re.MULTILINE)
        if path:
            found.add(path)
        for name in choices.group(1).split(",") if choices else []:
            pending.append((*path, name))
    commands = set(CLI_COMMANDS) | {p[:1] for p in CLI_COMMANDS}
    assert found == commands, found ^ commands  # a new subcommand needs a line in CLI_COMMANDS


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, micro_spec):
    """The files arguments are drawn from: random bytes and text, YAML of odd shapes, an empty file, a file
    that is not a database, an empty SQLite file, a directory, a missing path, and one real store with a
    study named 'stored' whose saved spec no longer validates (so `resume` would refuse it)."""
    import sqlite3

    root = tmp_path_factory.mktemp("cli-files")
    files = {"bytes": b"\x00\xff\xfe garbage \x80" * 40, "text": "just some text\n", "empty": b"",
             "yaml_list": "- 1\n- [2, {a: b}]\n", "yaml_bad": "name: [x\n",
             "yaml_spec_like": "name: x\nmodel: /nonexistent/m\n",
             "yaml_config": "method: ga\nlr: -1\n", "jsonl": '{"text": "x"}\n{"text": \n'}
    paths = []
    for name, body in files.items():
        path = root / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        paths.append(str(path))
    sqlite3.connect(root / "empty.db").close()
    (root / "dir").mkdir()
    paths += [str(root / "dir"), str(root / "missing" / "x"), str(root / "empty.db")]
    store_url = f"sqlite:///{root / 'store.db'}"
    store = Store(store_url)
    spec = StudySpec.model_validate(micro_spec(methods=["ga"], name="stored")).model_dump(mode="json")
    study_id = store.create_study("stored", "testbed:micro", 0, {**spec, "methods": ["no_such_method"]}, "", {})
    search = store.ensure_search(study_id, "ga", "ga", None, "stored/ga", "tpe", 1, {})
    trial = store.start_trial(search, {"lr": 1e-3, "epochs": 1})
    store.finish_trial(trial, "completed", {"forget_gap": 0.01, "utility_drop": 0.1},
                       {"metrics": {"forget_gap": 0.01, "utility_drop": 0.1, "mia_auc": 0.5, "forget_nll": 5.0,
                                    "unseen_nll": 5.0}, "config": {"method": "ga", "lr": 1e-3, "epochs": 1}})
    bad_stores = [f"sqlite:///{p}" for p in paths] + ["mysql://u:s3cret@h/db", "foo://x", "not a url",
                                                        "postgresql+psycopg2://u:s3cret@127.0.0.1:1/x",
                                                        "postgresql://u:s3cret@127.0.0.1:1/x", *paths]
    return {"file": paths, "bad_store": bad_stores, "store": [*bad_stores, store_url], "text": ODD_ARGS,
            "real_store": store_url}


@st.composite
def cli_invocations(draw, pools):
    """A subcommand with some of its options (values from the pools), positionals, and now and then an
    unknown flag or a value where none belongs."""
    command = draw(st.sampled_from(sorted(CLI_COMMANDS)))
    positionals, options = CLI_COMMANDS[command]

    def value(kind):
        return draw(st.sampled_from(kind if isinstance(kind, list) else pools[kind]))

    argv = list(command) + [value(kind) for kind in positionals]
    chosen = draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=len(options))) if options else []
    for flag in dict.fromkeys([*REQUIRED.get(command, []), *chosen]):
        kind = options[flag]
        argv += [flag] if kind is None else [flag, value(kind)]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--no-such-flag", "extra", "--storage"])))
    return argv


def test_every_subcommand_with_random_arguments_never_shows_a_traceback(cli_files, cache_dir, bench, capsys,
                                                                     monkeypatch):
    """The real CLI in-process: exit 0 (it worked), or 2 with one `error:` line (or argparse's usage) on
    stderr; never a traceback, never the unexpected-error path (exit 1)."""
    from tuner.cli import main

    monkeypatch.setenv("TUNER_STORAGE", cli_files["real_store"])  # no command touches the user's own store

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(cli_invocations(cli_files))
    def run(argv):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage and a one-line reason
            code = exc.code
        captured = capsys.readouterr()
        lines = [ln for ln in captured.err.splitlines() if ln.strip()]
        assert "Traceback" not in captured.err + captured.out, (argv, captured.err)
        assert code in (0, 2), (argv, code, captured.err)
        if code == 2 and not captured.err.startswith("usage:"):
            assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)

    run()
