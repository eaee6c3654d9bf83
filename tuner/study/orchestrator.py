"""Runs a study: per search unit (method, retain source) one Optuna multi-objective study, driven by Ray Tune.

The search is `tuner.study.search`, the recording to the store `tuner.study.recorder`, Ray and its resources
`tuner.study.cluster`, the lr range test before each unit's search `tuner.study.calibration`, the parameter
importance after it `tuner.study.importance`; this module prepares the study and runs its trials. Resuming
is a new Tuner on the same Optuna studies, with the budget reduced by the trials already finished.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from tuner import __version__
from tuner.core.errors import TunerError
from tuner.results import derived
from tuner.store import Store
from tuner.study import calibration, importance, rechecks, warmstart
from tuner.study.cluster import (
    StudyStopped,
    check_resources,
    restore_signals,
    signals_received,
    start_ray,
    stop_on_signals,
    trial_concurrency,
    trial_resources,
    worker_death,
    worker_task,
)
from tuner.study.context import TrialContext
from tuner.study.recorder import Event, StoreCallback
from tuner.study.search import UnitRun, UnitsSearcher, UnitTally, close_open_trials, optuna_storage, unit_search
from tuner.study.spec import StudySpec, unit_name
from tuner.study.trainable import trainable
from tuner.study.trial import prepare

__all__ = ["StudyOutcome", "StudyStopped", "run_study"]


@dataclass
class StudyOutcome:
    name: str
    storage: str
    units: dict[str, UnitTally] = field(default_factory=dict)
    pareto_sizes: dict[str, int] = field(default_factory=dict)
    recommendation: dict[str, Any] | None = None  # as stored by `tuner.results.derived.refresh`
    calibrations: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit -> its stored calibration


def package_versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {"unlearn-tuner": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "optuna": optuna.__version__, "ray": ray.__version__}


def run_study(spec: StudySpec, spec_text: str, store: Store, resume: bool = False,
              on_event: Event | None = None) -> StudyOutcome:
    """Run (or resume) every search unit of the study until its trial budget is spent.

    The data is prepared before the study row is written, so a study that cannot start leaves nothing
    behind. All units then share one Tune run (continued by a new one if a worker's death ends it).
    """
    import ray
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outcome = StudyOutcome(name=spec.name, storage=store.url)
    ray_dir = tempfile.mkdtemp(prefix="tuner-ray-")
    study_id: int | None = None
    previous = None
    started_ray = False
    signals_received.clear()
    try:
        started_ray = start_ray(spec.ray_address)
        previous = stop_on_signals()  # after ray.init: Ray's native handler would print a crash dump on SIGTERM
        check_resources(spec)
        concurrency = trial_concurrency(spec)  # refuses a local Ray that cannot hold one multi-worker trial
        context = TrialContext.of(spec)
        prepared = _prepare(spec, context)
        # before anything is stored: a warm start from a missing study or another model family is refused
        source = warmstart.source_of(spec, store, prepared["data_summary"].get("model"))
        if resume:
            _check_same_data(store, spec.name, prepared["data_summary"])
            study_id = store.study(spec.name).id
            store.interrupt_running(study_id, "driver stopped before the trial finished; re-run on resume")
        else:
            study_id = store.create_study(spec.name, spec.model, spec.seed, spec.model_dump(mode="json"), spec_text,
                                          package_versions())
        store.update_study(study_id, status="running", baseline=prepared["baseline"],
                           exact_retrain=prepared["exact_retrain"], data_summary=prepared["data_summary"])
        storage = optuna_storage(store)
        depth = (prepared["data_summary"].get("model") or {}).get("layers")
        searches = _searches(spec, store, study_id, storage, depth)
        outcome.calibrations = calibration.ensure(spec, store, searches, storage, context, prepared, depth,
                                                  _calibrating(spec, store, searches, on_event))
        units = _unit_runs(spec, store, searches, storage, outcome, on_event, depth, source,
                           context.rule(prepared["exact_retrain"]))
        if resume:
            derived.refresh(store, spec.name)  # trials of an older version or a killed driver
        _run_trials(spec, units, store, on_event, tune.with_parameters(trainable, ctx=context, prepared=prepared),
                    ray_dir, concurrency)
        importance.record(store, [(s.search_id, s.optuna_name) for s in searches], storage)
        derived.refresh(store, spec.name)
        rechecks.run(spec, store, context, prepared)  # derives again after each round of re-runs
        outcome.recommendation = store.recommendation(spec.name)
        store.update_study(study_id, status="finished")
    except BaseException as err:
        if study_id is not None:
            store.interrupt_running(study_id, "study stopped before the trial finished")
            with contextlib.suppress(Exception):  # the stop's own error is the one to report
                derived.refresh(store, spec.name)
            store.update_study(study_id, status="interrupted")
        if isinstance(err, KeyboardInterrupt) and not isinstance(err, StudyStopped) and signals_received:
            raise StudyStopped(signals_received[-1]) from None
        raise
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
        if started_ray and not spec.ray_address and ray.is_initialized():
            ray.shutdown()  # a Ray the caller started (a test's, a notebook's) is theirs to keep
        restore_signals(previous)
    outcome.pareto_sizes = pareto_sizes(store, spec.name)
    return outcome


def _run_trials(spec: StudySpec, units: list[UnitRun], store: Store, on_event: Event | None, runnable: Any,
                ray_dir: str, concurrency: int) -> None:
    """Every unit's remaining trials in one Tune run. A worker that dies mid-task (Ray's memory monitor, a
    crash) can end Tune's run with an error it does not expect; the trials it lost are then closed (failed
    and retried, or interrupted and run again) and a new run continues with the same searchers."""
    from ray import tune

    request = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}
    callback = StoreCallback(store, {u.name: u for u in units}, on_event, request, study=spec.name)
    searcher = UnitsSearcher([u for u in units if u.remaining > 0], list(spec.objectives))
    deadline = time.monotonic() + spec.budget.wall_time_min * 60 if spec.budget.wall_time_min else None
    for attempt in itertools.count(1):
        remaining = sum(u.remaining for u in units)
        left_s = deadline - time.monotonic() if deadline is not None else None
        if remaining <= 0 or (left_s is not None and left_s <= 0):
            return
        tuner = tune.Tuner(
            tune.with_resources(runnable, trial_resources(spec)),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=concurrency, reuse_actors=True,
                                        time_budget_s=left_s),
            run_config=tune.RunConfig(name=f"study-{attempt}", storage_path=ray_dir, verbose=0, callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=spec.retries)),
        )
        try:
            tuner.fit()
            return
        except RuntimeError as err:
            death = worker_death(err)
            if death is None:
                raise
            callback.lost(death, searcher)


def _prepare(spec: StudySpec, context: TrialContext) -> Any:
    """Tokenise and evaluate the original model once, on a worker with a trial's resources (the driver
    may have neither the data files nor a GPU). A user error there (a missing data file on the workers,
    say) comes back as the TunerError it is."""
    import ray
    from ray.exceptions import RayTaskError

    task = worker_task(prepare, spec)
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


def _searches(spec: StudySpec, store: Store, study_id: int, storage: optuna.storages.RDBStorage,
              depth: int | None) -> list[calibration.PlannedSearch]:
    """Each unit's search row (its declared ranges) and Optuna study name; runs a killed driver left open in
    the Optuna study are closed as failed."""
    searches = []
    for method, source in spec.units():
        unit = unit_name(method, source)
        optuna_name = f"{spec.name}/{unit}"
        search_id = store.ensure_search(study_id, unit, method, source, optuna_name, spec.sampler.name,
                                        spec.budget.trials,
                                        {k: r.model_dump() for k, r in spec.space_for(method, depth).items()})
        close_open_trials(storage, optuna_name)
        searches.append(calibration.PlannedSearch(unit, method, search_id, optuna_name))
    return searches


def _calibrating(spec: StudySpec, store: Store, searches: list[calibration.PlannedSearch],
                 on_event: Event | None) -> Callable[[str], None] | None:
    """The progress event of a unit whose calibration starts."""
    if on_event is None:
        return None
    ids = {s.unit: s.search_id for s in searches}

    def started(unit: str) -> None:
        on_event(unit, {"budget": spec.budget.trials, "finished": store.finished_count(ids[unit]), "running": 0,
                        "failed": 0, "best": None, "waiting": "calibrating the learning rate"})

    return started


def _unit_runs(spec: StudySpec, store: Store, searches: list[calibration.PlannedSearch],
               storage: optuna.storages.RDBStorage, outcome: StudyOutcome, on_event: Event | None,
               depth: int | None, source: str | None = None,
               rule: dict[str, Any] | None = None) -> list[UnitRun]:
    """Each unit's Optuna study over its ranges (the lr window of its calibration, if it has one), told the
    finished trials of the warm start's `source` study when it is new (scored by `rule`, this study's target),
    and the part of its budget still to run (none when its calibration found no window); `depth` (the model's
    decoder layers) resolves depth-relative ranges. The event of each unit carries its calibration's and its
    warm start's lines."""
    units = []
    earlier = store.trials(source) if source is not None else []  # read once for every unit
    for s in searches:
        stored = outcome.calibrations.get(s.unit)
        done = store.finished_count(s.search_id)
        tally = outcome.units[s.unit] = UnitTally(budget=spec.budget.trials, finished=done)
        remaining = 0 if calibration.refused(stored) else spec.budget.trials - done
        told: dict[str, int] = {}

        def priors(ranges, unit=s.unit, told=told):
            found, skipped = warmstart.priors(earlier, unit, ranges, list(spec.objectives), rule)
            told.update(told=len(found), skipped=skipped)
            return found

        units.append(UnitRun(s.unit, s.search_id, tally,
                             unit_search(spec, s.method, s.optuna_name, storage, depth, calibration.narrowed(stored),
                                         calibration.guideline_points(stored), remaining,
                                         priors if source is not None else None),
                             remaining))
        notes = ([f"calibration: {stored['summary']}"] if stored else []) + (
            [warmstart.line(source, told["told"], told["skipped"])] if told else [])
        if on_event is not None:
            on_event(s.unit, {"budget": tally.budget, "finished": done, "running": 0, "failed": 0, "best": None,
                              **({"note": "; ".join(notes)} if notes else {}),
                              **({"waiting": "not searched: no lr window"} if calibration.refused(stored) else {})})
    return units


def pareto_sizes(store: Store, name: str) -> dict[str, int]:
    """Trials on each unit's stored Pareto front."""
    sizes: dict[str, int] = {}
    for row in store.trials(name):
        sizes[row["unit"]] = sizes.get(row["unit"], 0) + int(row["pareto"])
    return sizes
