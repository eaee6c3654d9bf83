"""A trial's status, spelled once. A run ends `completed`, `stopped_at_target` or `diverged`; the study adds
`running` while it goes, `failed` when it produced no metrics (out of memory, a lost worker, an error) and
`interrupted` when the study stopped around it. Every reader groups them through the tuples here."""

from __future__ import annotations

from typing import Literal

RunStatus = Literal["completed", "stopped_at_target", "diverged"]
TrialStatus = Literal["running", "completed", "stopped_at_target", "diverged", "failed", "interrupted"]

RUNNING, COMPLETED, STOPPED_AT_TARGET = "running", "completed", "stopped_at_target"
DIVERGED, FAILED, INTERRUPTED = "diverged", "failed", "interrupted"

SCORED: tuple[str, ...] = (COMPLETED, STOPPED_AT_TARGET)  # the run ended with metrics a recommendation may use
BROKEN: tuple[str, ...] = (DIVERGED, FAILED)  # no usable metrics: told to the searcher as FAIL
FINISHED: tuple[str, ...] = SCORED + BROKEN  # the trial is over and will not run again
UNFINISHED: tuple[str, ...] = (RUNNING, INTERRUPTED)  # not an outcome (yet)
