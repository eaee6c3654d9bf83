"""Runs a study: per search unit (method, retain source) one Optuna multi-objective study, driven by Ray Tune.

The Optuna studies live in the same database as the store, so `optuna-dashboard` can open them too. Only
this driver writes to the store (through a Tune callback); trials report curve points and a final result.
Resuming is a new Tuner on the same Optuna studies, with the budget reduced by the trials already finished.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# TUNE_DISABLE_SIGINT_HANDLER: Ctrl+C raises KeyboardInterrupt in the driver (handled as a stop, below)
# instead of Tune's own handler, which ends the run as if it had finished.
for _name, _value in (("RAY_AIR_NEW_OUTPUT", "0"), ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
                      ("RAY_DEDUP_LOGS", "0"), ("RAY_USAGE_STATS_ENABLED", "0"), ("TUNE_DISABLE_SIGINT_HANDLER", "1"),
                      # curve points carry no objectives (only measured figures are reported)
                      ("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")):
    os.environ.setdefault(_name, _value)

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from tuner import __version__, derived, methods, rechecks  # noqa: E402
from tuner.candidates import CONSTRAINT_PREFIX  # noqa: E402
from tuner.errors import TunerError  # noqa: E402
from tuner.retry import TRANSIENT, with_retry  # noqa: E402
from tuner.spec import SamplerSpec, StudySpec, gpu_share, ray_address_problem, unit_name  # noqa: E402
from tuner.store import Store  # noqa: E402
from tuner.trial import hyperparameters_of, prepare, trainable  # noqa: E402

Event = Callable[[str, dict[str, Any]], None]
OPTUNA_TRANSIENT = (*TRANSIENT, optuna.exceptions.StorageInternalError)
DRIVER_CPU = 0.01  # a multi-worker trial's Tune actor only waits on Ray Train; its ranks hold the resources
DERIVE_EVERY_S = 5.0  # a running study's Pareto flags and recommendation are at most this old
WAIT_NOTICE_S = 60.0  # a trial pending this long gets a "waiting for ..." note in the progress display
MEMORY_MONITOR = "killed due to the node running low on memory"  # Ray's words for its memory monitor's kills


class StudyStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver: the trials are stopped and the study is left resumable."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def describe_failure(text: str) -> str:
    """A trial's error as a reason a user can act on: a worker killed by Ray's memory monitor, a worker
    process that died, a worker that failed while starting, else the error's last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if MEMORY_MONITOR in text:
        used = re.search(r"was ([\d.]+GB) used / ([\d.]+GB) limit", text)
        where = f" ({used.group(1)} of {used.group(2)} in use)" if used else ""
        return ("worker killed by Ray's memory monitor: the node ran low on host memory (RAM, not GPU memory)"
                f"{where}; run fewer trials at once (lower `concurrency`) or raise RAY_memory_usage_threshold "
                "(default 0.95) when starting Ray")
    if "temporarily unavailable" in text or "ActorUnavailableError" in text:
        return ("the trial's worker became unreachable (its node was lost, or its process died): "
                + (lines[-1] if lines else ""))[:500]
    if "worker process has died" in text or "WorkerCrashedError" in text or "ActorDiedError" in text:
        return ("the trial's worker process died (killed by a signal, the kernel's OOM killer or a crash): "
                + next((ln for ln in lines if "died" in ln), lines[-1] if lines else ""))[:500]
    if "ImplicitFunc.__init__" in text or "actor_init_failed" in text:
        return f"the trial's worker failed while starting: {lines[-1] if lines else '?'}"[:500]
    return lines[-1][:500] if lines else "trial failed (worker error)"


def _worker_death(err: BaseException) -> BaseException | None:
    """The Ray error behind a Tune run that died because a trial's worker did (Tune 2.x raises a
    RuntimeError for worker errors it does not expect, e.g. OutOfMemoryError), else None."""
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OutOfMemoryError | WorkerCrashedError | RayActorError):
            return cause
        cause = cause.__cause__
    return None


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
    """Optuna define-by-run space, one suggestion per hyperparameter the method declares; a class (not a
    closure) so Tune can pickle the searcher's state."""

    def __init__(self, spec: StudySpec, method: str) -> None:
        self.ranges = spec.space_for(method)
        self.declared = methods.get(method).space()

    def __call__(self, trial: optuna.Trial) -> None:
        for hp in self.declared:
            r = self.ranges[hp.name]
            hp.suggest(trial, r.low, r.high, bool(r.log))


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
    recommendation: dict[str, Any] | None = None  # as stored by `tuner.derived.refresh`


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

    def __init__(self, store: Store, units: dict[str, UnitRun], on_event: Event | None,
                 request: dict[str, float] | None = None, study: str | None = None) -> None:
        self.store, self.units, self.on_event, self.study = store, units, on_event, study
        self.request = request or {}  # what one trial asks of the cluster: {"CPU": 1, "GPU": 0}
        self.rows: dict[str, tuple[int, UnitRun]] = {}
        self.pids: dict[str, int] = {}  # trial id -> its worker's pid, from its results
        self.pending_since: dict[str, float] = {}
        self.waiting_note: dict[str, str] = {}  # unit -> "waiting for ..." while its trial waits for resources
        self.next_wait_check = 0.0
        self.next_derive = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into experiment state; a database handle is not state.
        return {}

    def _derive(self) -> None:
        """A trial finished: the study's Pareto flags and recommendation are derived again and stored, for
        the dashboards of a running study. At most every few seconds (and never more than a fifth of the
        driver's time): on a study of thousands of candidates a refresh takes a while; the study's end always
        derives them."""
        now = time.monotonic()
        if self.study is None or now < self.next_derive:
            return
        derived.refresh(self.store, self.study)
        spent = time.monotonic() - now
        self.next_derive = time.monotonic() + max(DERIVE_EVERY_S, 4 * spent)

    def _emit(self, unit: UnitRun) -> None:
        t = unit.tally
        if self.on_event is not None:
            self.on_event(unit.name, {"budget": t.budget, "finished": t.finished, "running": t.running,
                                      "failed": t.failed, "best": t.best, "waiting": self.waiting_note.get(unit.name)})

    def on_step_begin(self, iteration, trials, **info):
        """A trial pending for longer than WAIT_NOTICE_S: say what it waits for (checked every few seconds)."""
        now = time.monotonic()
        pending = {t.trial_id: t for t in trials if t.status == "PENDING" and "unit" in t.config}
        for trial_id in list(self.pending_since):
            if trial_id not in pending:
                del self.pending_since[trial_id]
        for trial_id in pending:
            self.pending_since.setdefault(trial_id, now)
        if now < self.next_wait_check:
            return
        self.next_wait_check = now + 5.0
        notes = {t.config["unit"]: waiting_note(self.request)
                 for trial_id, t in pending.items() if now - self.pending_since[trial_id] > WAIT_NOTICE_S}
        if notes != self.waiting_note:
            self.waiting_note = notes
            for unit in self.units.values():
                self._emit(unit)

    def _row(self, trial) -> tuple[int, UnitRun]:
        """The trial's store row; one is made for a trial that failed before it started (its worker died
        in its constructor), so that every failure is on record."""
        if trial.trial_id in self.rows:
            return self.rows.pop(trial.trial_id)
        unit = self.units[trial.config["unit"]]
        unit.tally.running += 1
        return self.store.start_trial(unit.search_id, hyperparameters_of(trial.config)), unit

    def on_trial_start(self, iteration, trials, trial, **info):
        unit = self.units[trial.config["unit"]]
        self.rows[trial.trial_id] = (self.store.start_trial(unit.search_id, hyperparameters_of(trial.config)), unit)
        unit.tally.running += 1
        self._emit(unit)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "pid" in result:
            self.pids[trial.trial_id] = result["pid"]
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
        self._derive()
        self._emit(unit)

    def _fail(self, trial, reason: str) -> None:
        row, unit = self._row(trial)
        unit.tally.running -= 1
        unit.tally.finished += 1
        unit.tally.failed += 1
        self.store.finish_trial(row, "failed", None, None, error=reason)
        self._derive()
        self._emit(unit)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._fail(trial, _trial_error(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Tune runs the same setting again (FailureConfig): this attempt is on record as failed, the retry
        gets a row of its own when its worker starts."""
        self._fail(trial, f"{_trial_error(trial)} (retrying this setting)")

    def lost(self, death: BaseException, searcher: UnitsSearcher) -> None:
        """The Tune run died with a trial's worker: every trial still running is closed. The trials whose
        worker was killed (by pid in Ray's message; the only one, when one was running) are failed with the
        reason and retried if their setting has retries left; the others are interrupted and run again."""
        text = str(death)
        killed_pids = {int(p) for p in re.findall(r"pid=(\d+)", text)}
        running = list(self.rows)
        for trial_id in running:
            row, unit = self.rows.pop(trial_id)
            unit.tally.running -= 1
            if self.pids.get(trial_id) in killed_pids or len(running) == 1:
                retried = searcher.requeue(trial_id, failed=True)
                reason = describe_failure(text) + (" (retrying this setting)" if retried else "")
                self.store.finish_trial(row, "failed", None, None, error=reason)
                unit.tally.finished += 1
                unit.tally.failed += 1
            else:
                searcher.requeue(trial_id, failed=False)
                self.store.finish_trial(row, "interrupted", None, None,
                                        error="stopped when another trial's worker died; run again")
            self._emit(unit)
        for trial_id in list(searcher.owner):  # suggested, but its worker never started
            searcher.requeue(trial_id, failed=False)


def waiting_note(request: dict[str, float]) -> str:
    """"waiting for 1 GPU; the cluster has 0 free": what a pending trial asks that the cluster lacks now."""
    import ray

    free = ray.available_resources()
    names = {"CPU": "CPU", "GPU": "GPU"}
    short = [k for k in names if request.get(k, 0) > free.get(k, 0)] or [k for k in names if request.get(k, 0)]
    return "; ".join(f"waiting for {request.get(k, 0):g} {names[k]}; the cluster has {free.get(k, 0):g} free"
                     for k in short[:1])


def _trial_error(trial) -> str:
    """The trial's exception as a reason a user can act on (e.g. CUDA out of memory, the memory monitor)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8").strip() if path else ""
    except OSError:
        text = ""
    return describe_failure(text)


class StudySearcher(OptunaSearch):
    """OptunaSearch that tells a diverged or failed trial as FAIL (NaN would leave it RUNNING forever) and
    waits out a briefly unavailable database instead of dropping the tell (Tune's version logs and moves on,
    which leaves the sampler blind to that trial).

    A setting whose trial was lost with its worker is handed out again (the same Optuna trial) before any
    new one, `retries` times; after that it is told as FAIL."""

    def __init__(self, *args: Any, retries: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retries = retries
        self.again: list[optuna.Trial] = []
        self.failures: dict[int, int] = {}  # Optuna trial number -> lost attempts

    def suggest(self, trial_id: str):
        if self.again and trial_id not in self._ot_trials:
            self._ot_trials[trial_id] = self.again.pop(0)  # OptunaSearch re-suggests an Optuna trial it holds
        return with_retry(lambda: super(StudySearcher, self).suggest(trial_id), "asking Optuna", OPTUNA_TRANSIENT)

    def requeue(self, trial_id: str, failed: bool) -> bool:
        """A trial lost with its Tune run: True if its setting runs again, False if told as FAIL."""
        ot_trial = self._ot_trials.pop(trial_id, None)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        if failed:
            self.failures[ot_trial.number] = self.failures.get(ot_trial.number, 0) + 1
        if self.failures.get(ot_trial.number, 0) > self.retries:
            with_retry(lambda: _tell(self._ot_study, ot_trial, None, TrialState.FAIL), "telling Optuna",
                       OPTUNA_TRANSIENT)
            return False
        self.again.append(ot_trial)
        return True

    def on_trial_complete(self, trial_id, result=None, error=False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        values = [result.get(m) for m in self._metric] if result else None
        failed = (error or values is None or (result or {}).get("status") in ("diverged", "failed")
                  or any(v is None or not math.isfinite(v) for v in values))
        state = TrialState.FAIL if failed else TrialState.COMPLETE
        if not failed:
            # Optuna 5's constraints (<= 0 feasible): the samplers learn where the feasible region is
            for key, value in (result or {}).items():
                if key.startswith(CONSTRAINT_PREFIX) and value is not None:
                    name = key[len(CONSTRAINT_PREFIX):]
                    with_retry(lambda n=name, v=value: ot_trial.set_constraint(n, v), "telling Optuna",
                               OPTUNA_TRANSIENT)
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

    def requeue(self, trial_id: str, failed: bool) -> bool:
        """A trial lost with the Tune run: its unit runs the setting again (one more trial) or gives up."""
        unit = self.owner.pop(trial_id, None)
        if unit is None or not unit.searcher.requeue(trial_id, failed):
            return False
        unit.remaining += 1
        return True


def _searcher(spec: StudySpec, method: str, optuna_name: str, storage: optuna.storages.BaseStorage):
    metrics = [f"obj_{o}" for o in spec.objectives]
    return StudySearcher(space=SearchSpaceFn(spec, method), metric=metrics, mode=["min"] * len(metrics),
                         sampler=make_sampler(spec.sampler, spec.budget.trials, spec.seed), study_name=optuna_name,
                         storage=storage, retries=spec.retries)


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
            "target": spec.target.model_dump(mode="json"), "robustness": spec.robustness.model_dump(mode="json"),
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
    behind. All units then share one Tune run (continued by a new one if a worker's death ends it).
    """
    import ray
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outcome = StudyOutcome(name=spec.name, storage=store.url)
    ray_dir = tempfile.mkdtemp(prefix="tuner-ray-")
    study_id: int | None = None
    previous = None
    _signals_received.clear()
    try:
        start_ray(spec.ray_address)
        previous = _stop_on_signals()  # after ray.init: Ray's native handler would print a crash dump on SIGTERM
        check_resources(spec)
        concurrency = trial_concurrency(spec)  # refuses a local Ray that cannot hold one multi-worker trial
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
        if resume:
            derived.refresh(store, spec.name)  # trials of an older version or a killed driver
        _run_trials(spec, units, store, on_event, tune.with_parameters(trainable, study=context, prepared=prepared),
                    ray_dir, concurrency)
        derived.refresh(store, spec.name)
        if spec.resources.workers == 1:  # re-runs are one-process runs (multi-rank checks: not yet)
            rechecks.run(spec, store, context, prepared)
        outcome.recommendation = derived.refresh(store, spec.name)
        store.update_study(study_id, status="finished")
    except BaseException as err:
        if study_id is not None:
            store.interrupt_running(study_id, "study stopped before the trial finished")
            with contextlib.suppress(Exception):  # the stop's own error is the one to report
                derived.refresh(store, spec.name)
            store.update_study(study_id, status="interrupted")
        if isinstance(err, KeyboardInterrupt) and not isinstance(err, StudyStopped) and _signals_received:
            raise StudyStopped(_signals_received[-1]) from None
        raise
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
        if ray.is_initialized() and not spec.ray_address:
            ray.shutdown()
        _restore_signals(previous)
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
    searcher = UnitsSearcher([u for u in units if u.remaining > 0], [f"obj_{o}" for o in spec.objectives])
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
            death = _worker_death(err)
            if death is None:
                raise
            callback.lost(death, searcher)


def check_resources(spec: StudySpec) -> None:
    """Refuse a study no node of the cluster can ever run a trial of (Ray would wait for it forever)."""
    import ray

    need = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise TunerError(f"resources: a trial asks for {need['CPU']:g} CPU and {need['GPU']:g} GPU, but no node of the "
                     f"Ray cluster has that (the largest has {largest.get('CPU', 0):g} CPU, "
                     f"{largest.get('GPU', 0):g} GPU); lower resources.cpus/resources.gpus or use a cluster that has them")


_signals_received: list[int] = []  # Ray and Tune may re-raise a plain KeyboardInterrupt; this keeps which signal


def _raise_stopped(signum: int, _frame: Any) -> None:
    _signals_received.append(signum)
    raise StudyStopped(signum)


def _stop_on_signals() -> dict[int, Any] | None:
    """SIGINT and SIGTERM raise StudyStopped in the driver, so the study is marked interrupted and Ray shut
    down in order (only possible in the main thread; elsewhere the caller's handlers stay)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_stopped)
    return previous


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _unit_runs(spec: StudySpec, store: Store, study_id: int, storage: optuna.storages.RDBStorage,
               outcome: StudyOutcome, on_event: Event | None) -> list[UnitRun]:
    """Each unit's search row, Optuna study (runs a killed driver left open closed as failed) and the part
    of its budget still to run."""
    units = []
    for method, source in spec.units():
        unit = unit_name(method, source)
        optuna_name = f"{spec.name}/{unit}"
        search_id = store.ensure_search(study_id, unit, method, source, optuna_name, spec.sampler.name,
                                        spec.budget.trials, {k: r.model_dump() for k, r in spec.space_for(method).items()})
        _clean_optuna(storage, optuna_name)
        done = store.finished_count(search_id)
        tally = outcome.units[unit] = UnitTally(budget=spec.budget.trials, finished=done)
        units.append(UnitRun(unit, search_id, tally, _searcher(spec, method, optuna_name, storage),
                             spec.budget.trials - done))
        if on_event is not None:
            on_event(unit, {"budget": tally.budget, "finished": done, "running": 0, "failed": 0, "best": None})
    return units


def pareto_sizes(store: Store, name: str) -> dict[str, int]:
    """Trials on each unit's stored Pareto front."""
    sizes: dict[str, int] = {}
    for row in store.trials(name):
        sizes[row["unit"]] = sizes.get(row["unit"], 0) + int(row["pareto"])
    return sizes


def _optuna_engine_kwargs(url: str) -> dict[str, Any]:
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
