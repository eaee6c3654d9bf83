"""Runs a study: per search unit (method, retain source) one Optuna multi-objective study, driven by Ray Tune.

The Optuna studies live in the same database as the store, so `optuna-dashboard` can open them too. Only
this driver writes to the store (through a Tune callback); trials report curve points and a final result.
Resuming is a new Tuner on the same Optuna studies, with the budget reduced by the trials already finished.
"""

from __future__ import annotations

import contextlib
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
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from tuner import __version__, methods  # noqa: E402
from tuner.errors import TunerError  # noqa: E402
from tuner.pareto import front_ids  # noqa: E402
from tuner.retry import TRANSIENT, with_retry  # noqa: E402
from tuner.spec import SamplerSpec, StudySpec, gpu_share, ray_address_problem, unit_name  # noqa: E402
from tuner.store import Store  # noqa: E402
from tuner.trial import prepare, trainable  # noqa: E402

Event = Callable[[str, dict[str, Any]], None]
OPTUNA_TRANSIENT = (*TRANSIENT, optuna.exceptions.StorageInternalError)
DRIVER_CPU = 0.01  # a multi-worker trial's Tune actor only waits on Ray Train; its ranks hold the resources


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


@dataclass
class UnitRun:
    """One search unit inside the study's single Tune run: its store row, tally and Optuna searcher."""

    name: str
    search_id: int
    tally: UnitTally
    searcher: StudySearcher
    remaining: int


class StoreCallback(Callback):
    """Writes every trial's start, curve points and outcome to the store as they happen (driver side)."""

    def __init__(self, store: Store, units: dict[str, UnitRun], on_event: Event | None) -> None:
        self.store, self.units, self.on_event = store, units, on_event
        self.rows: dict[str, tuple[int, UnitRun]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into experiment state; a database handle is not state.
        return {}

    def _emit(self, unit: UnitRun) -> None:
        t = unit.tally
        if self.on_event is not None:
            self.on_event(unit.name, {"budget": t.budget, "finished": t.finished, "running": t.running,
                                      "failed": t.failed, "best": t.best})

    def on_trial_start(self, iteration, trials, trial, **info):
        unit = self.units[trial.config["unit"]]
        params = {k: trial.config[k] for k in ("lr", "epochs", "retain_weight") if k in trial.config}
        self.rows[trial.trial_id] = (self.store.start_trial(unit.search_id, params), unit)
        unit.tally.running += 1
        self._emit(unit)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.rows and result.get("kind") == "curve":
            self.store.add_curve_point(self.rows[trial.trial_id][0], result["curve_point"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.rows:
            return
        row, unit = self.rows.pop(trial.trial_id)
        result = trial.last_result or {}
        t = unit.tally
        t.running -= 1
        t.finished += 1
        if result.get("kind") != "final":
            self.store.finish_trial(row, "failed", None, None, error="trial ended without a final result")
            t.failed += 1
        else:
            payload = result["payload"]
            objectives = {k[4:]: v for k, v in result.items() if k.startswith("obj_")}
            self.store.finish_trial(row, result["status"], objectives, payload)
            if result["status"] in ("diverged", "failed"):
                t.failed += 1
            elif payload.get("metrics"):
                m = payload["metrics"]
                if t.best is None or abs(m["forget_gap"]) < abs(t.best["forget_gap"]):
                    t.best = {"forget_gap": m["forget_gap"], "utility_drop": m.get("utility_drop", math.nan)}
        self._emit(unit)

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.rows:
            return
        row, unit = self.rows.pop(trial.trial_id)
        unit.tally.running -= 1
        unit.tally.finished += 1
        unit.tally.failed += 1
        self.store.finish_trial(row, "failed", None, None, error=_trial_error(trial))
        self._emit(unit)


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
    """OptunaSearch that tells a diverged or failed trial as FAIL (NaN would leave it RUNNING forever) and
    waits out a briefly unavailable database instead of dropping the tell (Tune's version logs and moves on,
    which leaves the sampler blind to that trial)."""

    def suggest(self, trial_id: str):
        return with_retry(lambda: super(StudySearcher, self).suggest(trial_id), "asking Optuna", OPTUNA_TRANSIENT)

    def on_trial_complete(self, trial_id, result=None, error=False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        values = [result.get(m) for m in self._metric] if result else None
        failed = (error or values is None or (result or {}).get("status") in ("diverged", "failed")
                  or any(v is None or not math.isfinite(v) for v in values))
        state = TrialState.FAIL if failed else TrialState.COMPLETE
        with_retry(lambda: _tell(self._ot_study, ot_trial, None if failed else values, state), "telling Optuna",
                   OPTUNA_TRANSIENT)
        self._completed_trials.add(trial_id)


def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # an earlier attempt got through
        study.tell(trial, values, state=state)


class UnitsSearcher(Searcher):
    """All search units of a study in one Tune run: units take turns, each asking its own Optuna study.

    One run (not one per unit) lets Ray reuse the trial actors, and with them the loaded model, across
    units, and makes a wall-time budget fair to every method instead of spending it on the first ones.
    """

    def __init__(self, units: list[UnitRun], metric: list[str]) -> None:
        super().__init__(metric=metric, mode=["min"] * len(metric))
        self.units = units
        self.owner: dict[str, UnitRun] = {}
        self.turn = 0

    def suggest(self, trial_id: str):
        for k in range(len(self.units)):
            unit = self.units[(self.turn + k) % len(self.units)]
            if unit.remaining <= 0:
                continue
            config = unit.searcher.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                continue
            unit.remaining -= 1
            self.owner[trial_id] = unit
            self.turn = (self.turn + k + 1) % len(self.units)
            return {**config, "unit": unit.name}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.owner[trial_id].searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        unit = self.owner.pop(trial_id, None)
        if unit is not None:
            unit.searcher.on_trial_complete(trial_id, result=result, error=error)


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
    problem = ray_address_problem(address)
    if problem:
        raise TunerError(f"{'--address' if address != os.environ.get('RAY_ADDRESS') else 'RAY_ADDRESS'}: {problem}")
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # "local": a fresh instance even when `ray start` left a cluster on this machine (plain ray.init()
        # would join that one).
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)


def _context(spec: StudySpec) -> dict[str, Any]:
    """What every worker needs to know about the study: plain data, shipped once through the object store."""
    return {"model": spec.model, "trust_remote_code": spec.trust_remote_code,
            "data": spec.data.model_dump(mode="json") if spec.data else None, "seed": spec.seed,
            "units": {unit_name(m, s): {"method": m, "retain_source": s} for m, s in spec.units()},
            "run": spec.run.model_dump(mode="json"), "objectives": list(spec.objectives),
            "threads": max(1, int(spec.resources.cpus)), "gpu_share": gpu_share(spec.resources.gpus),
            **_placement(spec)}


def _placement(spec: StudySpec) -> dict[str, Any]:
    """How one trial is placed: its workers, each with `cpus`/`gpus` (read by `tuner.multiworker`)."""
    r = spec.resources
    return {"workers": r.workers, "sharding": r.sharding, "cpus": r.cpus, "gpus": r.gpus}


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """What Tune reserves for one trial. A one-worker trial runs in the Tune trial itself. A multi-worker
    trial's ranks are Ray Train workers in their own placement group; the Tune trial only drives them and
    reserves a token CPU share, so a trial's resources are not counted twice."""
    if spec.resources.workers > 1:
        return {"cpu": DRIVER_CPU, "gpu": 0}
    return {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}


def trial_concurrency(spec: StudySpec) -> int:
    """Trials at once, each counted whole: the spec's concurrency, capped by how many trials' worth of CPUs and
    GPUs the cluster has (multi-worker trials beyond that would only wait for a placement group). A local Ray
    that cannot hold one trial is refused rather than left waiting (a cluster may still be scaling up)."""
    import ray

    r = spec.resources
    if r.workers == 1:
        return spec.concurrency
    total = ray.cluster_resources()
    need = {"CPU": r.cpus * r.workers + DRIVER_CPU, **({"GPU": r.gpus * r.workers} if r.gpus else {})}
    fits = min(int(total.get(name, 0) // amount) for name, amount in need.items())
    if fits == 0 and not (spec.ray_address or os.environ.get("RAY_ADDRESS")):
        have = ", ".join(f"{total.get(name, 0):g} {name}" for name in need)
        raise TunerError(f"resources: one trial of {r.workers} workers needs "
                         f"{', '.join(f'{v:g} {k}' for k, v in need.items())} (workers x per-worker, plus "
                         f"{DRIVER_CPU} CPU for the trial itself) but this machine's Ray has {have}: lower "
                         "resources.cpus (fractions allowed) or resources.workers")
    return max(1, min(spec.concurrency, fits))


def _prepare(spec: StudySpec, context: dict[str, Any]) -> Any:
    """Tokenise and evaluate the original model once, on a worker with a trial's resources (the driver
    may have neither the data files nor a GPU). A user error there (a missing data file on the workers,
    say) comes back as the TunerError it is."""
    import ray
    from ray.exceptions import RayTaskError

    task = ray.remote(max_calls=1)(prepare).options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
    try:
        return ray.get(task.remote(context))
    except RayTaskError as err:
        if isinstance(err.cause, TunerError):
            raise TunerError(str(err.cause)) from None
        raise


def _check_same_data(store: Store, name: str, summary: dict[str, Any]) -> None:
    """Resuming on other data would mix incomparable trials in one study: refuse."""
    stored = (store.study(name).data_summary or {}).get("sha256")
    if stored and stored != summary["sha256"]:
        changed = sorted(k for k in set(stored) | set(summary["sha256"]) if stored.get(k) != summary["sha256"].get(k))
        raise TunerError(f"study '{name}': the data changed since the study started ({', '.join(changed)} "
                         "differ); start a new study instead of resuming")


def run_study(spec: StudySpec, spec_text: str, store: Store, resume: bool = False,
              on_event: Event | None = None) -> StudyOutcome:
    """Run (or resume) every search unit of the study until its trial budget is spent.

    The data is prepared before the study row is written, so a study that cannot start leaves nothing
    behind. All units then share one Tune run.
    """
    import ray
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outcome = StudyOutcome(name=spec.name, storage=store.url)
    ray_dir = tempfile.mkdtemp(prefix="tuner-ray-")
    study_id: int | None = None
    try:
        start_ray(spec.ray_address)
        context = _context(spec)
        prepared = _prepare(spec, context)
        if resume:
            _check_same_data(store, spec.name, prepared["data_summary"])
            study_id = store.study(spec.name).id
            store.interrupt_running(study_id, "driver stopped before the trial finished; re-run on resume")
        else:
            study_id = store.create_study(spec.name, spec.model, spec.seed, spec.model_dump(mode="json"), spec_text,
                                          package_versions())
        store.update_study(study_id, status="running", baseline=prepared["baseline"],
                           exact_retrain=prepared["exact_retrain"], data_summary=prepared["data_summary"])
        with store.schema_lock():  # Optuna creates its tables on first use; two new studies must not race
            storage = optuna.storages.RDBStorage(store.url, engine_kwargs=_optuna_engine_kwargs(store.url))
        units = _unit_runs(spec, store, study_id, storage, outcome, on_event)
        remaining = sum(u.remaining for u in units)
        if remaining > 0:
            runnable = tune.with_resources(tune.with_parameters(trainable, study=context, prepared=prepared),
                                           trial_resources(spec))
            tuner = tune.Tuner(
                runnable,
                tune_config=tune.TuneConfig(
                    search_alg=UnitsSearcher([u for u in units if u.remaining > 0],
                                             [f"obj_{o}" for o in spec.objectives]),
                    num_samples=remaining, max_concurrent_trials=trial_concurrency(spec), reuse_actors=True,
                    time_budget_s=spec.budget.wall_time_min * 60 if spec.budget.wall_time_min else None),
                run_config=tune.RunConfig(name="study", storage_path=ray_dir, verbose=0,
                                          callbacks=[StoreCallback(store, {u.name: u for u in units}, on_event)],
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
            tuner.fit()
        store.update_study(study_id, status="finished")
    except BaseException:
        if study_id is not None:
            store.interrupt_running(study_id, "study stopped before the trial finished")
            store.update_study(study_id, status="interrupted")
        raise
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
        if ray.is_initialized() and not spec.ray_address:
            ray.shutdown()
    outcome.pareto_sizes = pareto_sizes(store, spec.name, spec.objectives)
    return outcome


def _unit_runs(spec: StudySpec, store: Store, study_id: int, storage: optuna.storages.RDBStorage,
               outcome: StudyOutcome, on_event: Event | None) -> list[UnitRun]:
    """Each unit's search row, Optuna study (runs a killed driver left open closed as failed) and the part
    of its budget still to run."""
    units = []
    for method, source in spec.units():
        unit = unit_name(method, source)
        optuna_name = f"{spec.name}/{unit}"
        search_id = store.ensure_search(study_id, unit, method, source, optuna_name, spec.sampler.name,
                                        spec.budget.trials, spec.space_for(method).model_dump())
        _clean_optuna(storage, optuna_name)
        done = store.finished_count(search_id)
        tally = outcome.units[unit] = UnitTally(budget=spec.budget.trials, finished=done)
        units.append(UnitRun(unit, search_id, tally, _searcher(spec, method, optuna_name, storage),
                             spec.budget.trials - done))
        if on_event is not None:
            on_event(unit, {"budget": tally.budget, "finished": done, "running": 0, "failed": 0, "best": None})
    return units


def pareto_sizes(store: Store, name: str, objectives: list[str]) -> dict[str, int]:
    return {unit: len(ids) for unit, ids in front_ids(store.trials(name), objectives).items()}


def _optuna_engine_kwargs(url: str) -> dict[str, Any]:
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
