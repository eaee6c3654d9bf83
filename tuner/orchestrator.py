"""Runs a study: per search unit (method, retain source) one Optuna multi-objective study, driven by Ray Tune.

The Optuna studies live in the same database as the store, so `optuna-dashboard` can open them too. Only
this driver writes to the store (through a Tune callback); trials report curve points and a final result.
Resuming is a new Tuner on the same Optuna studies, with the budget reduced by the trials already finished.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _name, _value in (("RAY_AIR_NEW_OUTPUT", "0"), ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
                      ("RAY_DEDUP_LOGS", "0"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_name, _value)

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from tuner import __version__, methods  # noqa: E402
from tuner.pareto import front_ids  # noqa: E402
from tuner.spec import SamplerSpec, StudySpec, unit_name  # noqa: E402
from tuner.store import Store  # noqa: E402
from tuner.trial import trainable  # noqa: E402

Event = Callable[[str, dict[str, Any]], None]


def make_sampler(spec: SamplerSpec, budget: int, seed: int) -> optuna.samplers.BaseSampler:
    """Small budgets need small warm-ups: defaults scale with the per-unit trial budget."""
    if spec.name == "tpe":
        startup = spec.n_startup_trials or max(3, min(10, budget // 3))
        return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, n_startup_trials=startup, seed=seed)
    if spec.name in ("nsga2", "nsga3"):
        pop = spec.population_size or max(4, min(50, budget // 3))
        cls = optuna.samplers.NSGAIISampler if spec.name == "nsga2" else optuna.samplers.NSGAIIISampler
        return cls(population_size=pop, seed=seed)
    if spec.name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.RandomSampler(seed=seed)


class SearchSpaceFn:
    """Optuna define-by-run space; a class (not a closure) so Tune can pickle the searcher's state."""

    def __init__(self, spec: StudySpec, method: str) -> None:
        self.space = spec.space_for(method)
        self.has_lambda = methods.get(method).has_retain_term

    def __call__(self, trial: optuna.Trial) -> None:
        sp = self.space
        trial.suggest_float("lr", sp.lr.low, sp.lr.high, log=sp.lr.log)
        trial.suggest_int("epochs", sp.epochs.low, sp.epochs.high)
        if self.has_lambda:
            trial.suggest_float("retain_weight", sp.retain_weight.low, sp.retain_weight.high, log=sp.retain_weight.log)


def package_versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {"unlearn-tuner": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "optuna": optuna.__version__, "ray": ray.__version__}


@dataclass
class UnitTally:
    budget: int
    finished: int = 0
    running: int = 0
    failed: int = 0
    best: dict[str, float] | None = None


@dataclass
class StudyOutcome:
    name: str
    storage: str
    units: dict[str, UnitTally] = field(default_factory=dict)
    pareto_sizes: dict[str, int] = field(default_factory=dict)


class StoreCallback(Callback):
    """Writes every trial's start, curve points and outcome to the store as they happen (driver side)."""

    def __init__(self, store: Store, study_id: int, search_id: int, unit: str, tally: UnitTally,
                 on_event: Event | None) -> None:
        self.store, self.study_id, self.search_id, self.unit = store, study_id, search_id, unit
        self.tally, self.on_event = tally, on_event
        self.rows: dict[str, int] = {}
        self.study_filled = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into experiment state; a database handle is not state.
        return {}

    def _emit(self) -> None:
        t = self.tally
        if self.on_event is not None:
            self.on_event(self.unit, {"budget": t.budget, "finished": t.finished, "running": t.running,
                                      "failed": t.failed, "best": t.best})

    def on_trial_start(self, iteration, trials, trial, **info):
        params = {k: trial.config[k] for k in ("lr", "epochs", "retain_weight") if k in trial.config}
        self.rows[trial.trial_id] = self.store.start_trial(self.search_id, params)
        self.tally.running += 1
        self._emit()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self.rows.get(trial.trial_id)
        if row is None:
            return
        if result.get("kind") == "curve":
            self.store.add_curve_point(row, result["curve_point"])
        elif result.get("kind") == "final" and not self.study_filled:
            self.store.update_study(self.study_id, baseline=result["baseline"],
                                    exact_retrain=result["exact_retrain"], data_summary=result["data_summary"])
            self.study_filled = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self.rows.pop(trial.trial_id, None)
        if row is None:
            return
        result = trial.last_result or {}
        t = self.tally
        t.running -= 1
        t.finished += 1
        if result.get("kind") != "final":
            self.store.finish_trial(row, "failed", None, None, error="trial ended without a final result")
            t.failed += 1
        else:
            payload = result["payload"]
            objectives = {k[4:]: v for k, v in result.items() if k.startswith("obj_")}
            self.store.finish_trial(row, result["status"], objectives, payload)
            if result["status"] == "diverged":
                t.failed += 1
            elif payload.get("metrics"):
                m = payload["metrics"]
                if t.best is None or abs(m["forget_gap"]) < abs(t.best["forget_gap"]):
                    t.best = {"forget_gap": m["forget_gap"], "utility_drop": m.get("utility_drop", math.nan)}
        self._emit()

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self.rows.pop(trial.trial_id, None)
        if row is None:
            return
        self.tally.running -= 1
        self.tally.finished += 1
        self.tally.failed += 1
        self.store.finish_trial(row, "failed", None, None, error=_trial_error(trial))
        self._emit()


def _trial_error(trial) -> str:
    """The last line of the trial's exception: the reason a user can act on (e.g. CUDA out of memory)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8").strip() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "trial failed (worker error)"


class StudySearcher(OptunaSearch):
    """A diverged trial is told to Optuna as FAIL (NaN would leave it RUNNING forever)."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and not error and trial_id in self._ot_trials:
            values = [result.get(m) for m in self._metric]
            if result.get("status") == "diverged" or any(v is None or not math.isfinite(v) for v in values):
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL)
                self._ot_trials.pop(trial_id, None)
                return
        super().on_trial_complete(trial_id, result=result, error=error)


def _searcher(spec: StudySpec, method: str, optuna_name: str, storage: optuna.storages.BaseStorage):
    metrics = [f"obj_{o}" for o in spec.objectives]
    return StudySearcher(space=SearchSpaceFn(spec, method), metric=metrics, mode=["min"] * len(metrics),
                         sampler=make_sampler(spec.sampler, spec.budget.trials, spec.seed), study_name=optuna_name,
                         storage=storage)


def _clean_optuna(storage: optuna.storages.RDBStorage, name: str) -> None:
    """Optuna trials a killed driver left RUNNING are closed as FAIL so samplers ignore them."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=os.cpu_count(), **kwargs)


def run_study(spec: StudySpec, spec_text: str, store: Store, resume: bool = False,
              on_event: Event | None = None) -> StudyOutcome:
    """Run (or resume) every search unit of the study until its trial budget is spent."""
    import ray
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if resume:
        study_id = store.study(spec.name).id
        store.interrupt_running(study_id, "driver stopped before the trial finished; re-run on resume")
    else:
        study_id = store.create_study(spec.name, spec.model, spec.seed, spec.model_dump(mode="json"), spec_text,
                                      package_versions())
    store.update_study(study_id, status="running")
    with store.schema_lock():  # Optuna creates its tables on first use; two new studies must not race
        storage = optuna.storages.RDBStorage(store.url, engine_kwargs=_optuna_engine_kwargs(store.url))
    outcome = StudyOutcome(name=spec.name, storage=store.url)
    ray_dir = tempfile.mkdtemp(prefix="tuner-ray-")
    try:
        start_ray(spec.ray_address)
        for method, source in spec.units():
            unit = unit_name(method, source)
            optuna_name = f"{spec.name}/{unit}"
            search_id = store.ensure_search(study_id, unit, method, source, optuna_name, spec.sampler.name,
                                            spec.budget.trials, spec.space_for(method).model_dump())
            _clean_optuna(storage, optuna_name)
            done = store.finished_count(search_id)
            tally = outcome.units[unit] = UnitTally(budget=spec.budget.trials, finished=done)
            remaining = spec.budget.trials - done
            if on_event is not None:
                on_event(unit, {"budget": tally.budget, "finished": done, "running": 0, "failed": 0, "best": None})
            if remaining <= 0:
                continue
            context = {"model": spec.model, "trust_remote_code": spec.trust_remote_code,
                       "data": spec.data.model_dump(mode="json") if spec.data else None, "seed": spec.seed,
                       "method": method, "retain_source": source, "run": spec.run.model_dump(mode="json"),
                       "objectives": list(spec.objectives), "threads": max(1, int(spec.resources.cpus))}
            runnable = tune.with_resources(tune.with_parameters(trainable, study=context),
                                           {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus})
            tuner = tune.Tuner(
                runnable,
                tune_config=tune.TuneConfig(
                    search_alg=_searcher(spec, method, optuna_name, storage), num_samples=remaining,
                    max_concurrent_trials=spec.concurrency, reuse_actors=True,
                    time_budget_s=spec.budget.wall_time_min * 60 if spec.budget.wall_time_min else None),
                run_config=tune.RunConfig(name=unit.replace("@", "-"), storage_path=ray_dir, verbose=0,
                                          callbacks=[StoreCallback(store, study_id, search_id, unit, tally, on_event)],
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
            tuner.fit()
        store.update_study(study_id, status="finished")
    except BaseException:
        store.interrupt_running(study_id, "study stopped before the trial finished")
        store.update_study(study_id, status="interrupted")
        raise
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
        if ray.is_initialized() and not spec.ray_address:
            ray.shutdown()
    outcome.pareto_sizes = pareto_sizes(store, spec.name, spec.objectives)
    return outcome


def pareto_sizes(store: Store, name: str, objectives: list[str]) -> dict[str, int]:
    return {unit: len(ids) for unit, ids in front_ids(store.trials(name), objectives).items()}


def _optuna_engine_kwargs(url: str) -> dict[str, Any]:
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
