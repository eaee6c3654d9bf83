"""The study store: SQLAlchemy 2 over a SQLite file (default) or PostgreSQL (by URL).

It is the single source of truth that dashboards, `study show` and exports read. Only the study driver
writes to it; schema changes arrive as Alembic migrations, run on open. The driver's reads and writes wait
out a database that is briefly away (tuner/core/retry.py); each such method is safe to repeat. The store is a
layer of its own: it imports the core only, and knows nothing of what the numbers it keeps mean.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import delete, func, inspect, select, tuple_, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import selectinload, sessionmaker

from tuner.core.errors import TunerError
from tuner.core.names import NAME_RULE, is_valid_name
from tuner.core.retry import retrying
from tuner.core.status import FINISHED, INTERRUPTED, RUNNING
from tuner.store.engine import (
    default_url,
    engine_for,
    first_line,
    mask_password,
    migrate,
    normalise_url,
    refuse_foreign,
    safe_url,
    schema_lock,
    what_works,
)
from tuner.store.schema import Check, CurvePoint, Metric, Recommendation, Search, Study, Trial

__all__ = ["Store", "default_url", "finite_json", "mask_password", "migrate", "normalise_url", "safe_url"]

# a subsampled utility figure's standard error travels with it (tuner.engine.evaluation.Screening)
CURVE_ERRORS = ("forget_nll_se", "unseen_nll_se", "retain_nll_se", "general_nll_se", "forget_gap_se", "utility_drop_se")
CURVE_KEYS = ("loss", "forget_nll", "unseen_nll", "retain_nll", "general_nll", "forget_gap", *CURVE_ERRORS)


class Store:
    """create=False (the read-only commands: show, export, resume) opens an existing store or fails: a
    mistyped --storage must not leave a new SQLite file or new tables behind."""

    def __init__(self, url: str | None = None, create: bool = True) -> None:
        self.url = normalise_url(url or default_url())
        self.engine = engine_for(self.url, create_folder=create and not url and not os.environ.get("TUNER_STORAGE"))
        if not create and self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:" and not Path(database).is_file():
                raise TunerError(f"no store at {safe_url(self.url)}: the SQLite file does not exist "
                                 "(run `tuner study run` first, or fix --storage)")
        try:
            with schema_lock(self.engine):  # under the lock: another process may be creating the tables
                tables = inspect(self.engine).get_table_names()
                if Study.__tablename__ not in tables:
                    refuse_foreign(self.url, tables, create)
                migrate(self.engine)
        except OperationalError as err:
            reason = first_line(str(err.orig) if err.orig else "") or "connection failed"
            raise TunerError(f"storage {safe_url(self.url)} is unreachable: {mask_password(reason, self.url)}") from None
        except DatabaseError as err:  # e.g. SQLite's "file is not a database"
            reason = first_line(str(err.orig) if err.orig else "") or type(err).__name__
            raise TunerError(f"storage {safe_url(self.url)} is not a usable database ({mask_password(reason, self.url)}); "
                             f"{what_works()}, pointing at a tuner store or a new file") from None
        except CommandError:  # Alembic: the store's revision is not one this version knows
            raise TunerError(f"storage {safe_url(self.url)} was written by a newer unlearn-tuner (unknown schema "
                             "revision); upgrade unlearn-tuner to open it") from None
        except OSError as err:  # the SQLite lock file beside the database
            raise TunerError(f"storage {safe_url(self.url)}: {err.strerror or type(err).__name__}") from None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({safe_url(self.url)})"

    def schema_lock(self):
        """For other schemas that share this database (Optuna's), created on first use."""
        return schema_lock(self.engine)

    # ---- studies ---------------------------------------------------------------------------------------
    def create_study(self, name: str, model: str, seed: int, spec: dict, spec_text: str, versions: dict) -> int:
        """A new study row; a name already taken (also by a process that won a race to create it) is a
        TunerError that points at `tuner study resume`. A password in the spec's storage URL is not stored."""
        if not is_valid_name(name):
            raise TunerError(f"study name {name!r}: {NAME_RULE}")
        spec, spec_text = _without_password(spec, spec_text)
        try:
            with self.sessions.begin() as s:
                if s.scalar(select(Study.id).where(Study.name == name)) is not None:
                    raise self._taken(name)
                study = Study(name=name, model=model, seed=seed, spec=spec, spec_text=spec_text, versions=versions,
                              status="created")
                s.add(study)
                s.flush()
                return study.id
        except IntegrityError:
            raise self._taken(name) from None

    def _taken(self, name: str) -> TunerError:
        return TunerError(f"a study named '{name}' already exists in {safe_url(self.url)} "
                          f"(use `tuner study resume {name}` or --name NEW)")

    @retrying
    def study(self, name: str) -> Study:
        with self.sessions() as s:
            study = s.scalar(select(Study).where(Study.name == name).options(selectinload(Study.searches)))
        if study is None:
            known = ", ".join(self.study_names()[:10]) or "none"
            raise TunerError(f"no study named '{name}' in {safe_url(self.url)} (studies: {known})")
        return study

    def study_names(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Study.name).order_by(Study.created_at)))

    def list_studies(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            counts = dict(s.execute(select(Search.study_id, func.count(Trial.id)).join(Trial)
                                    .where(Trial.status.in_(FINISHED)).group_by(Search.study_id)).all())
            return [{"name": st.name, "model": st.model, "status": st.status, "trials": counts.get(st.id, 0),
                     "created_at": st.created_at} for st in s.scalars(select(Study).order_by(Study.created_at))]

    @retrying
    def update_study(self, study_id: int, **fields: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.id == study_id).values(**fields,
                                                                       updated_at=datetime.now(timezone.utc)))

    # ---- searches and trials ---------------------------------------------------------------------------
    @retrying
    def ensure_search(self, study_id: int, unit: str, method: str, retain_source: str | None, optuna_study: str,
                      sampler: str, budget: int, space: dict) -> int:
        with self.sessions.begin() as s:
            found = s.scalar(select(Search.id).where(Search.study_id == study_id, Search.unit == unit))
            if found is not None:
                return found
            search = Search(study_id=study_id, unit=unit, method=method, retain_source=retain_source,
                            optuna_study=optuna_study, sampler=sampler, budget=budget, space=space)
            s.add(search)
            s.flush()
            return search.id

    @retrying
    def set_calibration(self, search_id: int, calibration: dict[str, Any], space: dict | None = None) -> None:
        """A search's calibration record, and the ranges its search draws from once calibrated."""
        with self.sessions.begin() as s:
            values: dict[str, Any] = {"calibration": finite_json(calibration)}
            if space is not None:
                values["space"] = space
            s.execute(update(Search).where(Search.id == search_id).values(**values))

    def calibrations(self, study_name: str) -> dict[str, dict[str, Any]]:
        """{unit: calibration record} of the study's searches that have one."""
        return self._search_records(study_name, Search.calibration)

    @retrying
    def set_importance(self, search_id: int, importance: dict[str, Any]) -> None:
        """A search's parameter importance record (`tuner.study.importance`)."""
        with self.sessions.begin() as s:
            s.execute(update(Search).where(Search.id == search_id).values(importance=finite_json(importance)))

    def importances(self, study_name: str) -> dict[str, dict[str, Any]]:
        """{unit: parameter importance record} of the study's searches that have one."""
        return self._search_records(study_name, Search.importance)

    @retrying
    def _search_records(self, study_name: str, column: Any) -> dict[str, dict[str, Any]]:
        """{unit: value of a JSON `column` of tuner_searches} for the study's searches where it is set."""
        study = self.study(study_name)
        with self.sessions() as s:
            rows = s.execute(select(Search.unit, column).where(Search.study_id == study.id)
                             .order_by(Search.id)).all()
        return {unit: record for unit, record in rows if record is not None}

    @retrying
    def finished_count(self, search_id: int) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count(Trial.id)).where(Trial.search_id == search_id,
                                                               Trial.status.in_(FINISHED))) or 0

    def start_trial(self, search_id: int, params: dict, host: str | None = None) -> int:
        """A new trial row numbered after the search's last one.

        Safe to retry: the key is drawn once per call, so a retry after a commit whose answer the database
        never delivered (a restart at that moment) returns the row that commit made, not a second one."""
        return self._start_trial(search_id, params, host, uuid.uuid4().hex)

    @retrying
    def _start_trial(self, search_id: int, params: dict, host: str | None, key: str) -> int:
        with self.sessions.begin() as s:
            found = s.scalar(select(Trial.id).where(Trial.start_key == key))
            if found is not None:
                return found
            number = (s.scalar(select(func.max(Trial.number)).where(Trial.search_id == search_id)) or 0) + 1
            trial = Trial(search_id=search_id, number=number, status=RUNNING, params=params, host=host,
                          start_key=key)
            s.add(trial)
            s.flush()
            return trial.id

    @retrying
    def add_curve_point(self, trial_id: int, point: dict[str, float]) -> None:
        with self.sessions.begin() as s:
            step = int(point["step"])
            if s.get(CurvePoint, (trial_id, step)) is None:
                s.add(CurvePoint(trial_id=trial_id, step=step, **{k: _finite(point.get(k)) for k in CURVE_KEYS}))

    @retrying
    def finish_trial(self, trial_id: int, status: str, objectives: dict | None, payload: dict | None,
                     error: str | None = None) -> None:
        """Record a trial's outcome, final metrics and whole curve in one transaction."""
        payload = payload or {}
        env = payload.get("environment") or {}
        with self.sessions.begin() as s:
            trial = s.get(Trial, trial_id)
            trial.status = status
            trial.objectives = {k: _finite(v) for k, v in (objectives or {}).items()}
            trial.error = error or payload.get("reason")
            trial.result = {k: payload.get(k) for k in ("planned_steps", "steps_done", "selected_step", "stop_step",
                                                        "diverged_step", "train_tokens", "eval_tokens",
                                                        "train_time_s", "eval_time_s", "baseline_time_s", "environment",
                                                        "config", "subsampled")
                            if k in payload}
            trial.device = env.get("device_name") or env.get("device")
            trial.host = env.get("host") or trial.host
            trial.world_size = env.get("world_size")
            trial.effective_batch = env.get("effective_batch")
            trial.wall_time_s = payload.get("wall_time_s")
            trial.finished_at = datetime.now(timezone.utc)
            for name, value in (payload.get("metrics") or {}).items():
                s.merge(Metric(trial_id=trial_id, name=name, value=_finite(value)))
            for point in payload.get("curve") or []:
                if s.get(CurvePoint, (trial_id, int(point["step"]))) is None:
                    s.add(CurvePoint(trial_id=trial_id, step=int(point["step"]),
                                     **{k: _finite(point.get(k)) for k in CURVE_KEYS}))
            checks = payload.get("checks")
            if checks:
                _merge_check(s, trial_id, checks)

    @retrying
    def add_check(self, trial_id: int, checks: dict[str, Any]) -> None:
        """Robustness checks of a candidate run after its trial (`{"step", "metrics", "details", "time_s"}`);
        metrics of an earlier check of the same candidate are kept unless named again."""
        with self.sessions.begin() as s:
            _merge_check(s, trial_id, checks)

    def study_checks(self, study_name: str) -> dict[tuple[int, int], dict[str, Any]]:
        """{(trial id, step): {"metrics", "details", "time_s"}} of every checked candidate of the study."""
        study = self.study(study_name)
        with self.sessions() as s:
            rows = s.scalars(select(Check).join(Trial, Trial.id == Check.trial_id)
                             .join(Search, Search.id == Trial.search_id).where(Search.study_id == study.id))
            return {(c.trial_id, c.step): {"metrics": c.metrics, "details": c.details, "time_s": c.time_s}
                    for c in rows}

    @retrying
    def interrupt_running(self, study_id: int, reason: str) -> int:
        """Trials left 'running' by a driver that died: marked interrupted (not counted, not lost)."""
        with self.sessions.begin() as s:
            ids = select(Search.id).where(Search.study_id == study_id)
            res = s.execute(update(Trial).where(Trial.search_id.in_(ids), Trial.status == RUNNING)
                            .values(status=INTERRUPTED, error=reason, finished_at=datetime.now(timezone.utc)))
            return res.rowcount or 0

    @retrying
    def trials(self, study_name: str) -> list[dict[str, Any]]:
        """Every trial of a study as a flat row: unit, params, status, objectives, metrics, timings.

        Two plain column queries rather than ORM objects: a dashboard reads every trial of a large study on
        each page load, and building an object per metric row was most of that time."""
        study = self.study(study_name)
        in_study = Search.study_id == study.id
        with self.sessions() as s:
            rows = s.execute(select(Trial.id, Search.unit, Search.method, Search.retain_source, Trial.number,
                                    Trial.status, Trial.params, Trial.pareto, Trial.objectives, Trial.error,
                                    Trial.wall_time_s,
                                    Trial.device, Trial.effective_batch, Trial.world_size, Trial.result)
                             .join(Search).where(in_study).order_by(Search.id, Trial.number)).all()
            metrics: dict[int, dict[str, float | None]] = {}
            for trial_id, name, value in s.execute(select(Metric.trial_id, Metric.name, Metric.value)
                                                   .join(Trial).join(Search).where(in_study)):
                metrics.setdefault(trial_id, {})[name] = value
        return [{"id": r.id, "unit": r.unit, "method": r.method, "retain_source": r.retain_source,
                 "number": r.number, "status": r.status, "params": r.params, "pareto": bool(r.pareto),
                 "objectives": r.objectives or {},
                 "error": r.error, "metrics": metrics.get(r.id, {}), "wall_time_s": r.wall_time_s,
                 "device": r.device, "effective_batch": r.effective_batch, "world_size": r.world_size,
                 "result": r.result or {}} for r in rows]

    def curve(self, trial_id: int) -> list[dict[str, Any]]:
        with self.sessions() as s:
            points = s.scalars(select(CurvePoint).where(CurvePoint.trial_id == trial_id).order_by(CurvePoint.step))
            return [{"step": p.step, **{k: getattr(p, k) for k in CURVE_KEYS}} for p in points]

    @retrying
    def set_pareto(self, study_id: int, front: set[tuple[int, int | None]]) -> None:
        """The study's Pareto flags from the candidates `(trial id, step)` on the front: those checkpoints
        on it, and a trial on it when one of its checkpoints is; everything else of the study off it."""
        trial_ids = sorted({t for t, _ in front}) or [-1]
        with self.sessions.begin() as s:
            searches = select(Search.id).where(Search.study_id == study_id)
            s.execute(update(Trial).where(Trial.search_id.in_(searches)).values(pareto=Trial.id.in_(trial_ids)))
            trials = select(Trial.id).where(Trial.search_id.in_(searches))
            points = sorted((t, step) for t, step in front if step is not None) or [(-1, -1)]
            s.execute(update(CurvePoint).where(CurvePoint.trial_id.in_(trials))
                      .values(pareto=tuple_(CurvePoint.trial_id, CurvePoint.step).in_(points)))

    def study_curves(self, study_id: int) -> dict[int, list[dict[str, Any]]]:
        """Every trial's curve of one study in one query: {trial id: [points by step, with their flag]}."""
        columns = [CurvePoint.trial_id, CurvePoint.step, CurvePoint.pareto, *(getattr(CurvePoint, k) for k in CURVE_KEYS)]
        query = (select(*columns).join(Trial, Trial.id == CurvePoint.trial_id)
                 .join(Search, Search.id == Trial.search_id).where(Search.study_id == study_id)
                 .order_by(CurvePoint.trial_id, CurvePoint.step))
        out: dict[int, list[dict[str, Any]]] = {}
        with self.sessions() as s:
            for row in s.execute(query):
                out.setdefault(row[0], []).append({"step": row[1], "pareto": bool(row[2]),
                                                   **dict(zip(CURVE_KEYS, row[3:], strict=True))})
        return out

    @retrying
    def replace_recommendations(self, study_id: int, items: list[tuple[str | None, int | None, dict]]) -> None:
        """The study's recommendations (unit or None for overall, trial, payload), replacing older ones."""
        with self.sessions.begin() as s:
            s.execute(delete(Recommendation).where(Recommendation.study_id == study_id))
            s.add_all(Recommendation(study_id=study_id, method=unit, trial_id=trial_id, payload=payload)
                      for unit, trial_id, payload in items)

    def recommendations(self, study_name: str) -> dict[str | None, dict]:
        study = self.study(study_name)
        with self.sessions() as s:
            rows = s.scalars(select(Recommendation).where(Recommendation.study_id == study.id))
            return {r.method: r.payload for r in rows}

    def recommendation(self, study_name: str) -> dict[str, Any] | None:
        """The stored recommendation as the recommender made it ({"units": ..., "overall": ...}), or None
        before the study driver has derived one."""
        stored = self.recommendations(study_name)
        if not stored:
            return None
        return {"units": {u: p for u, p in stored.items() if u is not None}, "overall": stored.get(None) or {}}


def _merge_check(session, trial_id: int, checks: dict[str, Any]) -> None:
    step = int(checks["step"])
    metrics = {k: _finite(v) for k, v in (checks.get("metrics") or {}).items()}
    found = session.get(Check, (trial_id, step))
    if found is None:
        session.add(Check(trial_id=trial_id, step=step, metrics=metrics, details=checks.get("details"),
                          time_s=checks.get("time_s")))
    else:
        found.metrics = {**found.metrics, **metrics}
        found.details = {**(found.details or {}), **(checks.get("details") or {})}
        found.time_s = (found.time_s or 0.0) + (checks.get("time_s") or 0.0)


def _without_password(spec: dict, spec_text: str) -> tuple[dict, str]:
    """The spec as stored: its storage URL (from the file or --storage) with the password masked."""
    url = spec.get("storage") if isinstance(spec, dict) else None
    if not isinstance(url, str):
        return spec, spec_text
    try:
        password = make_url(normalise_url(url)).password
    except ArgumentError:
        return spec, spec_text
    if not password:
        return spec, spec_text
    password = str(password)
    return {**spec, "storage": safe_url(url)}, spec_text.replace(password, "***")


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float made None, at any depth (JSON columns refuse NaN and infinity)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def _finite(value: Any) -> float | None:
    """NaN/inf become NULL: PostgreSQL and JSON both reject them, and a missing value is the honest one."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None
