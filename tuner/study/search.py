"""The search: per search unit one Optuna multi-objective study, asked and told through Optuna's public
interface, and one Ray Tune `Searcher` that lets the units take turns.

The Optuna studies live in the store's database, so `optuna-dashboard` can open them and a resumed study
goes on from the trials they hold.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tuner.core.retry import TRANSIENT, with_retry
from tuner.engine import methods
from tuner.store import Store
from tuner.study.report import TrialReport, objective_key
from tuner.study.spec import Range, SamplerSpec, StudySpec
from tuner.study.warmstart import Prior

OPTUNA_TRANSIENT = (*TRANSIENT, optuna.exceptions.StorageInternalError)


WARMED_UP = ("tpe", "gp")  # samplers whose first trials are random draws until they can model


def startup_trials(spec: SamplerSpec, budget: int) -> int:
    """TPE's or the GP's trials before it models: small budgets need small warm-ups, so the default scales with the
    per-unit trial budget."""
    return spec.n_startup_trials or max(3, min(10, budget // 3))


def make_sampler(spec: SamplerSpec, budget: int, seed: int) -> optuna.samplers.BaseSampler:
    if spec.name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, constant_liar=True,
                                          n_startup_trials=startup_trials(spec, budget), seed=seed)
    if spec.name == "gp":  # a Gaussian process: for the smallest budgets; it reads the trials' constraints too
        return optuna.samplers.GPSampler(n_startup_trials=startup_trials(spec, budget), seed=seed)
    if spec.name in ("nsga2", "nsga3"):
        pop = spec.population_size or max(4, min(50, budget // 3))
        cls = optuna.samplers.NSGAIISampler if spec.name == "nsga2" else optuna.samplers.NSGAIIISampler
        return cls(population_size=pop, seed=seed)
    if spec.name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.RandomSampler(seed=seed)


class SearchSpaceFn:
    """Optuna define-by-run space, one suggestion per hyperparameter the method declares; a class (not a
    closure) so Tune can pickle the searcher's state. `depth`: the model's decoder layers, against which a
    depth-relative knob's default range is resolved (RMU's layer); `narrowed`: ranges that replace the spec's
    (the lr window of the unit's calibration, `tuner.study.calibration`)."""

    def __init__(self, spec: StudySpec, method: str, depth: int | None = None,
                 narrowed: dict[str, Range] | None = None) -> None:
        self.ranges = {**spec.space_for(method, depth), **(narrowed or {})}
        self.declared = methods.get(method).space()

    def spread(self, n: int, seed: int) -> list[dict[str, float | int]]:
        """`n` settings spread over the ranges: a scrambled Sobol sequence, one axis per hyperparameter, so no
        two fall near each other the way independent random draws can."""
        from scipy.stats import qmc

        if n <= 0:
            return []
        # the first n points of a power-of-two run: every prefix of a Sobol sequence is spread out
        points = qmc.Sobol(d=len(self.declared), scramble=True, seed=seed).random_base2(max(0, (n - 1).bit_length()))[:n]
        return [{hp.name: hp.at(float(u[i]), self.ranges[hp.name].low, self.ranges[hp.name].high,
                                bool(self.ranges[hp.name].log)) for i, hp in enumerate(self.declared)}
                for u in points]

    def guideline(self, points: list[dict[str, float | int]]) -> list[dict[str, float | int]]:
        """The calibration's guideline points (`tuner.study.calibration.guideline_points`: settings, longest
        horizon first) whose every value falls inside the searched ranges; a hyperparameter a point leaves out
        is the sampler's to choose. The longest first: a trial stops at the band, so the longest horizon is the
        likeliest to reach it and costs no more steps when a shorter one would have reached it too."""
        return [p for p in points if all(k in self.ranges and self.ranges[k].low <= v <= self.ranges[k].high
                                         for k, v in p.items())]

    def __call__(self, trial: optuna.Trial) -> dict[str, float | int]:
        """The trial's setting (asking again for a name the trial holds gives back its value)."""
        setting = {}
        for hp in self.declared:
            r = self.ranges[hp.name]
            setting[hp.name] = hp.suggest(trial, r.low, r.high, bool(r.log))
        return setting


def optuna_storage(store: Store) -> optuna.storages.RDBStorage:
    """Optuna's storage on the store's database. Optuna creates its tables on first use; two new studies
    must not race at that."""
    kwargs = {"connect_args": {"timeout": 60}} if store.url.startswith("sqlite") else {"pool_pre_ping": True}
    with store.schema_lock():
        return optuna.storages.RDBStorage(store.url, engine_kwargs=kwargs)


def open_study(storage: optuna.storages.BaseStorage, name: str, sampler: optuna.samplers.BaseSampler,
               objectives: list[str]) -> optuna.Study:
    """The unit's Optuna study, created or (on resume) loaded, one minimised value per objective, named so
    that optuna-dashboard shows the objectives by name."""

    def create() -> optuna.Study:
        study = optuna.create_study(storage=storage, sampler=sampler, pruner=optuna.pruners.NopPruner(),
                                    study_name=name, load_if_exists=True, directions=["minimize"] * len(objectives))
        with warnings.catch_warnings():  # set_metric_names is marked experimental since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))
        return study

    return with_retry(create, "opening the Optuna study", OPTUNA_TRANSIENT)


def close_open_trials(storage: optuna.storages.BaseStorage, name: str) -> None:
    """Optuna trials a killed driver left RUNNING (or WAITING) are closed as FAIL so samplers ignore them."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        with_retry(lambda n=t.number: tell(study, n, None, TrialState.FAIL), "telling Optuna", OPTUNA_TRANSIENT)
    for _ in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        # Optuna tells only RUNNING trials; its ask hands out a queued (WAITING) one before any new one
        queued = with_retry(study.ask, "asking Optuna", OPTUNA_TRANSIENT)
        with_retry(lambda q=queued: tell(study, q, None, TrialState.FAIL), "telling Optuna", OPTUNA_TRANSIENT)


def tell(study: optuna.Study, trial: optuna.Trial | int, values: list[float] | None, state: TrialState) -> None:
    """Optuna's tell, once: a retry after an attempt that got through is a no-op."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, values, state=state, skip_if_finished=True)


class UnitSearch:
    """One search unit's Optuna study driven by ask and tell.

    A diverged or failed trial is told as FAIL (NaN would leave it RUNNING forever), and a briefly unavailable
    database is waited out instead of dropping the tell (which would leave the sampler blind to that trial).
    A setting whose trial was lost with its worker is handed out again (the same Optuna trial) before any
    new one, `retries` times; after that it is told as FAIL."""

    def __init__(self, study: optuna.Study, space: SearchSpaceFn, objectives: list[str], retries: int) -> None:
        self.study, self.space, self.retries = study, space, retries
        self.objectives = objectives  # told as the study's values, in this order
        self.running: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial, until told
        self.again: list[optuna.Trial] = []
        self.failures: dict[int, int] = {}  # Optuna trial number -> lost attempts

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.running:
            self.running[trial_id] = (self.again.pop(0) if self.again
                                      else with_retry(self.study.ask, "asking Optuna", OPTUNA_TRANSIENT))
        trial = self.running[trial_id]
        return with_retry(lambda: self.space(trial), "asking Optuna", OPTUNA_TRANSIENT)

    def requeue(self, trial_id: str, failed: bool) -> bool:
        """A trial lost with its Tune run: True if its setting runs again, False if told as FAIL."""
        trial = self.running.pop(trial_id, None)
        if trial is None:
            return False
        if failed:
            self.failures[trial.number] = self.failures.get(trial.number, 0) + 1
        if self.failures.get(trial.number, 0) > self.retries:
            self._tell(trial, None, TrialState.FAIL)
            return False
        self.again.append(trial)
        return True

    def complete(self, trial_id: str, report: TrialReport | None, error: bool) -> None:
        """Tell Optuna the trial's objectives, with its constraints (Optuna 5: <= 0 is feasible, so the
        samplers learn where the feasible region is); FAIL for an error, a diverged or failed trial, or a
        missing or non-finite objective."""
        trial = self.running.pop(trial_id, None)
        if trial is None:
            return
        values = [report.objectives.get(o) for o in self.objectives] if report else None
        failed = (error or report is None or report.broken
                  or any(v is None or not math.isfinite(v) for v in values))
        if not failed:
            for name, value in report.constraints.items():
                with_retry(lambda n=name, v=value: trial.set_constraint(n, v), "telling Optuna", OPTUNA_TRANSIENT)
        self._tell(trial, None if failed else values, TrialState.FAIL if failed else TrialState.COMPLETE)

    def _tell(self, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
        with_retry(lambda: tell(self.study, trial, values, state), "telling Optuna", OPTUNA_TRANSIENT)


def unit_search(spec: StudySpec, method: str, optuna_name: str, storage: optuna.storages.BaseStorage,
                depth: int | None = None, narrowed: dict[str, Range] | None = None,
                guideline: list[dict[str, float | int]] | None = None, remaining: int | None = None,
                priors: Callable[[dict[str, Range]], list[Prior]] | None = None) -> UnitSearch:
    """The unit's search: its Optuna study with the spec's sampler, over the method's space (with `narrowed`
    ranges in place of the spec's). A new study is first told the warm start's `priors` (given the unit's
    ranges, `tuner.study.warmstart`), then starts from enqueued settings (`first_settings`), at most
    `remaining` of them (the trials it will run; default: the budget)."""
    objectives = list(spec.objectives)
    study = open_study(storage, optuna_name, make_sampler(spec.sampler, spec.budget.trials, spec.seed), objectives)
    space = SearchSpaceFn(spec, method, depth, narrowed)
    if not with_retry(lambda: study.get_trials(deepcopy=False), "reading Optuna", OPTUNA_TRANSIENT):
        told = priors(space.ranges) if priors is not None else []
        for prior in told:
            with_retry(lambda p=prior: tell_prior(study, space, p, spec.warm_start), "telling Optuna",
                       OPTUNA_TRANSIENT)
        budget = spec.budget.trials if remaining is None else remaining
        for setting in first_settings(spec, space, guideline or [], budget, len(told)):
            with_retry(lambda s=setting: study.enqueue_trial(s, skip_if_exists=True), "queueing in Optuna",
                       OPTUNA_TRANSIENT)
    return UnitSearch(study, space, objectives, spec.retries)


def tell_prior(study: optuna.Study, space: SearchSpaceFn, prior: Prior, source: str | None) -> None:
    """A warm start's finished trial, told as a live one is: queued, asked (the space suggests its queued
    values), its constraints set, told COMPLETE with its objectives; marked with the study it came from."""
    study.enqueue_trial(prior.params)
    trial = study.ask()
    space(trial)
    trial.set_user_attr("warm_start", source)
    for name, value in prior.constraints.items():
        trial.set_constraint(name, value)
    tell(study, trial, list(prior.values), TrialState.COMPLETE)


def first_settings(spec: StudySpec, space: SearchSpaceFn, guideline: list[dict[str, float | int]],
                   budget: int, known: int = 0) -> list[dict[str, Any]]:
    """What a new unit's search runs first, at most `budget` settings: the calibration's guideline points inside
    the ranges (`SearchSpaceFn.guideline`), then, for TPE and the GP, their random warm-up replaced by settings
    spread over the ranges (`SearchSpaceFn.spread`), as many as the warm-up still needs after the `known`
    finished trials a warm start told the sampler."""
    first = space.guideline(guideline)[:budget]
    if spec.sampler.name in WARMED_UP:
        n = min(startup_trials(spec.sampler, spec.budget.trials), budget) - len(first) - known
        first += space.spread(n, spec.seed)
    return first


@dataclass
class UnitTally:
    budget: int
    finished: int = 0
    running: int = 0
    failed: int = 0
    best: dict[str, float] | None = None


@dataclass
class UnitRun:
    """One search unit inside the study's single Tune run: its store row, tally and search."""

    name: str
    search_id: int
    tally: UnitTally
    searcher: UnitSearch
    remaining: int


class UnitsSearcher(Searcher):
    """All search units of a study in one Tune run: units take turns, each asking its own Optuna study.

    One run (not one per unit) lets Ray reuse the trial actors, and with them the loaded model, across
    units, and makes a wall-time budget fair to every method instead of spending it on the first ones.
    """

    def __init__(self, units: list[UnitRun], objectives: list[str]) -> None:
        super().__init__(metric=[objective_key(o) for o in objectives], mode=["min"] * len(objectives))
        self.units = units
        self.owner: dict[str, UnitRun] = {}
        self.turn = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        for k in range(len(self.units)):
            unit = self.units[(self.turn + k) % len(self.units)]
            if unit.remaining <= 0:
                continue
            config = unit.searcher.suggest(trial_id)
            unit.remaining -= 1
            self.owner[trial_id] = unit
            self.turn = (self.turn + k + 1) % len(self.units)
            return {**config, "unit": unit.name}
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        unit = self.owner.pop(trial_id, None)
        if unit is not None:
            unit.searcher.complete(trial_id, TrialReport.from_tune(result), error)

    def requeue(self, trial_id: str, failed: bool) -> bool:
        """A trial lost with the Tune run: its unit runs the setting again (one more trial) or gives up."""
        unit = self.owner.pop(trial_id, None)
        if unit is None or not unit.searcher.requeue(trial_id, failed):
            return False
        unit.remaining += 1
        return True
