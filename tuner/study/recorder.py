"""Recording a study as it runs: a Ray Tune callback on the driver writes every trial's start, curve points
and outcome to the store, keeps each unit's tally for the progress display and says what a pending trial
waits for. Only the driver writes to the store; trials report curve points and a final result to Tune.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tuner.core.status import FAILED, INTERRUPTED
from tuner.results import derived
from tuner.store import Store
from tuner.study.report import CurveReport, TrialReport
from tuner.study.search import UnitRun, UnitsSearcher
from tuner.study.trial import hyperparameters_of

Event = Callable[[str, dict[str, Any]], None]
DERIVE_EVERY_S = 5.0  # a running study's Pareto flags and recommendation are at most this old
WAIT_NOTICE_S = 60.0  # a trial pending this long gets a "waiting for ..." note in the progress display
MEMORY_MONITOR = "killed due to the node running low on memory"  # Ray's words for its memory monitor's kills


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
        curve = CurveReport.from_tune(result)
        if trial.trial_id in self.rows and curve is not None:
            self.store.add_curve_point(self.rows[trial.trial_id][0], curve.point)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.rows:
            return
        row, unit = self.rows.pop(trial.trial_id)
        final = TrialReport.from_tune(trial.last_result)
        t = unit.tally
        t.running -= 1
        t.finished += 1
        if final is None:
            self.store.finish_trial(row, FAILED, None, None, error="trial ended without a final result")
            t.failed += 1
        else:
            self.store.finish_trial(row, final.status, final.objectives, final.payload)
            if final.broken:
                t.failed += 1
            elif final.metrics:
                m = final.metrics
                if t.best is None or abs(m["forget_gap"]) < abs(t.best["forget_gap"]):
                    t.best = {"forget_gap": m["forget_gap"], "utility_drop": m.get("utility_drop")}
        self._derive()
        self._emit(unit)

    def _fail(self, trial, reason: str) -> None:
        row, unit = self._row(trial)
        unit.tally.running -= 1
        unit.tally.finished += 1
        unit.tally.failed += 1
        self.store.finish_trial(row, FAILED, None, None, error=reason)
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
                self.store.finish_trial(row, FAILED, None, None, error=reason)
                unit.tally.finished += 1
                unit.tally.failed += 1
            else:
                searcher.requeue(trial_id, failed=False)
                self.store.finish_trial(row, INTERRUPTED, None, None,
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
