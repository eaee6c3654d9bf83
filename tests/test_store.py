"""The store on SQLite and PostgreSQL: rows land, NaN is not stored as a number, errors are one line."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from tuner.core.errors import TunerError
from tuner.store import Store, safe_url


def test_trial_lifecycle_is_stored(store_url):
    store = Store(store_url)
    study_id = store.create_study("lifecycle", "testbed:micro", 0, {"name": "lifecycle"}, "name: lifecycle\n", {})
    search = store.ensure_search(study_id, "ga_gd@general", "ga_gd", "general", "lifecycle/ga_gd@general", "tpe", 3,
                                 {"lr": [1e-4, 1e-3]})
    assert store.ensure_search(study_id, "ga_gd@general", "ga_gd", "general", "x", "tpe", 3, {}) == search
    trial = store.start_trial(search, {"lr": 1e-3, "epochs": 2, "retain_weight": 1.0})
    store.add_curve_point(trial, {"step": 0, "forget_nll": 4.0, "unseen_nll": 5.0, "forget_gap": -1.0})
    store.add_curve_point(trial, {"step": 5, "forget_nll": 5.1, "unseen_nll": 5.0, "forget_gap": 0.1, "loss": -5})
    payload = {"metrics": {"forget_gap": 0.1, "utility_drop": float("nan")}, "steps_done": 5,
               "environment": {"device": "cpu", "device_name": "x86_64", "world_size": 1, "effective_batch": 8},
               "curve": [{"step": 5, "forget_nll": 9.9}], "wall_time_s": 1.5}
    store.finish_trial(trial, "stopped_at_target", {"forget_gap": 0.1, "utility_drop": float("inf")}, payload)
    [row] = store.trials("lifecycle")
    assert row["status"] == "stopped_at_target" and row["unit"] == "ga_gd@general"
    assert row["metrics"] == {"forget_gap": 0.1, "utility_drop": None}
    assert row["objectives"] == {"forget_gap": 0.1, "utility_drop": None}
    assert row["effective_batch"] == 8 and row["world_size"] == 1 and row["device"] == "x86_64"
    curve = store.curve(row["id"])
    assert [p["step"] for p in curve] == [0, 5] and curve[1]["forget_nll"] == 5.1  # first write wins
    assert store.finished_count(search) == 1
    second = store.start_trial(search, {"lr": 2e-3, "epochs": 1})
    assert store.interrupt_running(study_id, "driver stopped") == 1
    assert store.finished_count(search) == 1
    assert [r["number"] for r in store.trials("lifecycle")] == [1, 2] and second


def test_tables_do_not_collide_with_optuna(store_url):
    import optuna

    store = Store(store_url)
    optuna.create_study(storage=store.url, study_name="coexist", directions=["minimize", "minimize"])
    names = set(inspect(store.engine).get_table_names())
    assert {"tuner_studies", "tuner_trials", "tuner_curve", "tuner_alembic_version"} <= names
    assert {"studies", "trials", "alembic_version"} <= names  # Optuna's own
    Store(store_url)  # re-opening runs migrations again: a no-op


def test_duplicate_and_unknown_study_names(store_url):
    store = Store(store_url)
    store.create_study("twice", "m", 0, {}, "", {})
    with pytest.raises(TunerError, match="a study named 'twice' already exists"):
        store.create_study("twice", "m", 0, {}, "", {})
    with pytest.raises(TunerError, match="no study named 'nope'.*twice"):
        store.study("nope")


def test_unreachable_storage_is_one_line_without_the_password():
    with pytest.raises(TunerError) as err:
        Store("postgresql+psycopg://admin:s3cret@127.0.0.1:1/none")
    assert "unreachable" in str(err.value) and "s3cret" not in str(err.value)
    assert "s3cret" not in safe_url("postgresql://admin:s3cret@db/x")


def test_start_trial_retried_after_a_lost_commit_adds_one_row(store_url, monkeypatch):
    """The database commits the new trial but its answer is lost (a restart at that moment): the retry
    must find that row, not add a second trial for the same Ray trial."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    monkeypatch.setenv("TUNER_STORE_RETRY_S", "30")
    store = Store(store_url)
    study_id = store.create_study("lost", "testbed:micro", 0, {"name": "lost"}, "name: lost\n", {})
    search = store.ensure_search(study_id, "ga", "ga", None, "lost/ga", "tpe", 3, {})
    lost = []

    def answer_lost(session) -> None:
        if not lost:
            lost.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    event.listen(store.sessions, "after_commit", answer_lost)
    trial = store.start_trial(search, {"lr": 1e-3, "epochs": 1})
    event.remove(store.sessions, "after_commit", answer_lost)
    assert lost == [True]  # the first attempt did commit and then failed
    rows = store.trials("lost")
    assert [(r["id"], r["number"]) for r in rows] == [(trial, 1)]
    assert store.start_trial(search, {"lr": 2e-3, "epochs": 1}) != trial
    assert [r["number"] for r in store.trials("lost")] == [1, 2]


def test_a_store_written_before_the_start_key_is_upgraded(store_url):
    """A store made at schema revision 0001 (before trials had a start key) opens, keeps its trials and
    takes new ones."""
    from sqlalchemy import create_engine, text

    from tuner.store import migrate

    engine = create_engine(store_url)
    migrate(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tuner_studies (id, name, status, model, seed, spec, spec_text, created_at, "
                          "updated_at) VALUES (1, 'old', 'finished', 'm', 0, '{}', '', '2026-11-22', '2026-11-22')"))
        conn.execute(text("INSERT INTO tuner_searches (id, study_id, unit, method, optuna_study, sampler, budget, "
                          "space) VALUES (1, 1, 'ga', 'ga', 'old/ga', 'tpe', 2, '{}')"))
        conn.execute(text("INSERT INTO tuner_trials (search_id, number, status, params, started_at) "
                          "VALUES (1, 1, 'completed', '{\"lr\": 0.001}', '2026-11-22')"))
    engine.dispose()
    store = Store(store_url)
    assert "start_key" in {c["name"] for c in inspect(store.engine).get_columns("tuner_trials")}
    store.start_trial(1, {"lr": 2e-3, "epochs": 1})
    assert [(r["number"], r["params"]["lr"]) for r in store.trials("old")] == [(1, 0.001), (2, 0.002)]


def test_a_store_written_before_declared_hyperparameters_opens_and_shows_its_studies(store_url, tmp_path):
    """A store at revision 0002 (a column per hyperparameter, no stored Pareto flags) is migrated on open:
    its studies are listed, its trials keep their settings, the Pareto front of its stored objectives is
    flagged, and `tuner study show` prints it with its stored recommendation."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from sqlalchemy import create_engine, text

    from tuner.store import migrate

    engine = create_engine(store_url)
    migrate(engine, "0002")
    spec = {"name": "old", "objectives": ["forget_gap", "utility_drop"], "methods": ["ga_gd"],
            "target": {"gap_tolerance": 0.1, "utility_tolerance": 0.5}}
    trials = [(1, 1e-3, 2.0, 0.5, 0.05, 0.2), (2, 2e-3, 3.0, 1.0, 0.01, 0.4), (3, 1e-4, 1.0, 2.0, 0.3, 0.5)]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tuner_studies (id, name, status, model, seed, spec, spec_text, created_at, "
                          "updated_at) VALUES (1, 'old', 'finished', 'testbed:micro', 0, :spec, '', '2026-11-22', "
                          "'2026-11-22')"), {"spec": json.dumps(spec)})
        conn.execute(text("INSERT INTO tuner_searches (id, study_id, unit, method, retain_source, optuna_study, "
                          "sampler, budget, space) VALUES (1, 1, 'ga_gd@general', 'ga_gd', 'general', "
                          "'old/ga_gd@general', 'tpe', 3, '{}')"))
        for number, lr, epochs, lam, gap, drop in trials:
            params = {"lr": lr, "epochs": epochs, "retain_weight": lam}
            conn.execute(text("INSERT INTO tuner_trials (search_id, number, status, params, lr, epochs, retain_weight, "
                              "objectives, started_at) VALUES (1, :n, 'completed', :p, :lr, :ep, :lam, :obj, "
                              "'2026-11-22')"),
                         {"n": number, "p": json.dumps(params), "lr": lr, "ep": epochs, "lam": lam,
                          "obj": json.dumps({"forget_gap": gap, "utility_drop": drop})})
            conn.execute(text("INSERT INTO tuner_metrics (trial_id, name, value) VALUES (:t, 'forget_gap', :g)"),
                         {"t": number, "g": gap})
        overall = {"unit": "ga_gd@general", "trial_id": 2, "number": 2, "status": "recommended", "reason": "in band",
                   "params": {"lr": 2e-3, "epochs": 3.0, "retain_weight": 1.0},
                   "metrics": {"forget_gap": 0.01, "utility_drop": 0.4, "forget_nll": 5.0, "unseen_nll": 5.0}}
        conn.execute(text("INSERT INTO tuner_recommendations (study_id, method, trial_id, payload, created_at) "
                          "VALUES (1, NULL, 2, :p, '2026-11-22')"), {"p": json.dumps(overall)})
    engine.dispose()

    store = Store(store_url)
    columns = {c["name"] for c in inspect(store.engine).get_columns("tuner_trials")}
    assert {"lr", "epochs", "retain_weight"}.isdisjoint(columns) and "pareto" in columns
    assert [s["name"] for s in store.list_studies()] == ["old"]
    rows = store.trials("old")
    assert [r["params"]["retain_weight"] for r in rows] == [0.5, 1.0, 2.0]
    # (0.05, 0.2) and (0.01, 0.4) trade off; (0.3, 0.5) is dominated by both
    assert [r["pareto"] for r in rows] == [True, True, False]
    assert store.recommendation("old")["overall"]["trial_id"] == 2
    if store_url.startswith("sqlite"):
        tuner = str(Path(sys.executable).with_name("tuner"))
        shown = subprocess.run([tuner, "study", "show", "old", "--storage", store_url], capture_output=True,
                               text=True, timeout=120, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
        assert shown.returncode == 0, shown.stderr
        assert "lr 2.00e-03, epochs 3, λ 1" in shown.stdout and "overall recommendation" in shown.stdout


def test_the_migrations_build_the_schema_the_code_declares(store_url):
    """Alembic finds nothing to add or drop between the migrated database and tuner.store.schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tuner.store.schema import Base

    store = Store(store_url)
    with store.engine.connect() as conn:
        ours = lambda name, type_, parent: type_ != "table" or (name.startswith("tuner_")  # noqa: E731
                                                                and name != "tuner_alembic_version")
        ctx = MigrationContext.configure(conn, opts={"include_name": ours})
        assert compare_metadata(ctx, Base.metadata) == []


def _one_line_refusal(*args: str) -> str:
    """`tuner ARGS` through the real CLI: exit 2 and one line on stderr, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tuner = str(Path(sys.executable).with_name("tuner"))
    proc = subprocess.run([tuner, *args], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TUNER_STORAGE"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]


def test_a_file_that_is_not_a_database_is_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database, just text\n" * 100)
    url = f"sqlite:///{corrupt}"
    for args in (["study", "list"], ["study", "show", "x"], ["export", "x"], ["dashboard", "export", "x", "-o",
                                                                            str(tmp_path / "r.html")]):
        line = _one_line_refusal(*args, "--storage", url)
        assert url in line and "not a usable database" in line and "sqlite:///PATH" in line, line
    assert corrupt.read_bytes().startswith(b"this is not a database")  # left as it was


@pytest.mark.parametrize("url, needle", [
    ("mysql://me:s3cret@db.example/studies", "'mysql' databases are not supported"),
    ("oracle://me:s3cret@db.example/x", "'oracle' databases are not supported"),
    ("postgresql+psycopg2://me:s3cret@127.0.0.1/x", "database driver 'psycopg2' is not available"),
    ("postgresql+nodriver://me:s3cret@127.0.0.1/x", "database driver 'nodriver' is not available"),
])
def test_unsupported_urls_and_missing_drivers_are_one_line_naming_what_works(url, needle):
    line = _one_line_refusal("study", "list", "--storage", url)
    assert needle in line and "s3cret" not in line and "me:***@" in line, line
    assert "sqlite:///PATH" in line and "postgresql://USER@HOST/DB" in line, line


def test_another_programs_database_is_left_alone(tmp_path):
    import sqlite3

    other = tmp_path / "crm.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(TunerError, match=r"holds another program's tables \(customers\)"):
        Store(f"sqlite:///{other}")
    line = _one_line_refusal("study", "list", "--storage", f"sqlite:///{other}")
    assert "no tuner tables" in line, line
    with sqlite3.connect(other) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert tables == ["customers"]  # no tuner tables written into it
