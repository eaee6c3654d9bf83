"""The store's tables. Names carry a `tuner_` prefix: Optuna keeps its own tables in the same database."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Study(Base):
    __tablename__ = "tuner_studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="created")  # created/running/interrupted/finished
    model: Mapped[str] = mapped_column(String(500))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict] = mapped_column(JSON)  # the validated spec, as data
    spec_text: Mapped[str] = mapped_column(Text, default="")  # the YAML the user wrote
    baseline: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the original model's metrics
    exact_retrain: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # testbed only
    data_summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # blocks per set, file hashes
    versions: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # package versions
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    searches: Mapped[list[Search]] = relationship(back_populates="study", cascade="all, delete-orphan")
    recommendations: Mapped[list[Recommendation]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Search(Base):
    """One method's search inside a study: one Optuna study, one sampler."""

    __tablename__ = "tuner_searches"
    __table_args__ = (UniqueConstraint("study_id", "unit"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("tuner_studies.id", ondelete="CASCADE"))
    unit: Mapped[str] = mapped_column(String(100))  # method, or method@retain_source
    method: Mapped[str] = mapped_column(String(100))
    retain_source: Mapped[str | None] = mapped_column(String(40), nullable=True)
    optuna_study: Mapped[str] = mapped_column(String(300))
    sampler: Mapped[str] = mapped_column(String(100))
    budget: Mapped[int] = mapped_column(Integer)
    space: Mapped[dict] = mapped_column(JSON)  # the ranges searched (the lr window, once calibrated)
    # the lr range test before the search (tuner.study.calibration): its curve, finding and window; NULL when
    # the study ran none
    calibration: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # which hyperparameter moved each objective (tuner.study.importance), computed at the study's end
    importance: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    study: Mapped[Study] = relationship(back_populates="searches")
    trials: Mapped[list[Trial]] = relationship(back_populates="search", cascade="all, delete-orphan")


class Trial(Base):
    __tablename__ = "tuner_trials"
    __table_args__ = (UniqueConstraint("search_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    search_id: Mapped[int] = mapped_column(ForeignKey("tuner_searches.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # the Optuna trial number
    status: Mapped[str] = mapped_column(String(30))  # a TrialStatus of tuner.core.status (no check constraint)
    params: Mapped[dict] = mapped_column(JSON)  # the method's hyperparameters (tuner.core.hparams), by name
    # on its search unit's Pareto front: derived by the study driver as trials finish, read by every view
    pareto: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    objectives: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # steps, tokens, timings, environment
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(200), nullable=True)
    world_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    effective_batch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    wall_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # one per `Store.start_trial` call, shared by its retries: a retry after a commit whose answer was lost
    # finds this row instead of adding a second (NULL on rows from before migration 0002)
    start_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True, index=True)

    search: Mapped[Search] = relationship(back_populates="trials")
    metrics: Mapped[list[Metric]] = relationship(back_populates="trial", cascade="all, delete-orphan")
    curve: Mapped[list[CurvePoint]] = relationship(back_populates="trial", cascade="all, delete-orphan",
                                                   order_by="CurvePoint.step")


class Metric(Base):
    """A final metric of a trial (of its selected checkpoint)."""

    __tablename__ = "tuner_metrics"

    trial_id: Mapped[int] = mapped_column(ForeignKey("tuner_trials.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)

    trial: Mapped[Trial] = relationship(back_populates="metrics")


class CurvePoint(Base):
    """An in-run evaluation: the unlearning curve. Every evaluated checkpoint is a candidate setting (the
    trial's hyperparameters, stopped at this step)."""

    __tablename__ = "tuner_curve"

    trial_id: Mapped[int] = mapped_column(ForeignKey("tuner_trials.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    forget_nll: Mapped[float | None] = mapped_column(Float, nullable=True)
    unseen_nll: Mapped[float | None] = mapped_column(Float, nullable=True)
    retain_nll: Mapped[float | None] = mapped_column(Float, nullable=True)
    general_nll: Mapped[float | None] = mapped_column(Float, nullable=True)
    forget_gap: Mapped[float | None] = mapped_column(Float, nullable=True)
    # standard errors of the figures scored on a subsample of their set; NULL where the set was scored whole
    forget_nll_se: Mapped[float | None] = mapped_column(Float, nullable=True)
    unseen_nll_se: Mapped[float | None] = mapped_column(Float, nullable=True)
    forget_gap_se: Mapped[float | None] = mapped_column(Float, nullable=True)
    retain_nll_se: Mapped[float | None] = mapped_column(Float, nullable=True)
    general_nll_se: Mapped[float | None] = mapped_column(Float, nullable=True)
    utility_drop_se: Mapped[float | None] = mapped_column(Float, nullable=True)
    # this evaluated checkpoint (a candidate) is on its search unit's Pareto front (tuner.results.derived)
    pareto: Mapped[bool | None] = mapped_column(Boolean, nullable=True)

    trial: Mapped[Trial] = relationship(back_populates="curve")


class Check(Base):
    """Robustness checks of one candidate (a trial's checkpoint at `step`): the forget gap after a relearning
    attack and after weight quantization, the spread over seeds. Merged into the candidate's metrics, so
    the recommender and the dashboards read them like any other metric."""

    __tablename__ = "tuner_checks"

    trial_id: Mapped[int] = mapped_column(ForeignKey("tuner_trials.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[dict] = mapped_column(JSON)  # relearn_gap, relearn_drop, quant4_gap, seed spread, ...
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the attack's curve
    time_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # what the checks cost
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Recommendation(Base):
    __tablename__ = "tuner_recommendations"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("tuner_studies.id", ondelete="CASCADE"))
    method: Mapped[str | None] = mapped_column(String(100), nullable=True)  # None: across methods
    trial_id: Mapped[int | None] = mapped_column(ForeignKey("tuner_trials.id", ondelete="SET NULL"), nullable=True)
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="recommendations")
