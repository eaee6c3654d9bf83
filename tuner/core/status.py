"""A trial's status, spelled once. A run ends `completed` (it ran its horizon), `stopped_at_target` (its forget
gap reached 0), `stopped_hopeless` (at its pace it could not reach the target band by its horizon),
`stopped_collapsed` (its utility drop passed the tolerance at two utility-measuring evaluations in a row) or
`diverged`; the study adds `running` while it goes, `failed` when it produced no metrics (out of memory, a lost
worker, an error) and `interrupted` when the study stopped around it. Every reader groups them through the
tuples here."""

from __future__ import annotations

from typing import Literal

RunStatus = Literal["completed", "stopped_at_target", "stopped_hopeless", "stopped_collapsed", "diverged"]
TrialStatus = Literal["running", "completed", "stopped_at_target", "stopped_hopeless", "stopped_collapsed",
                      "diverged", "failed", "interrupted"]

RUNNING, COMPLETED, STOPPED_AT_TARGET = "running", "completed", "stopped_at_target"
STOPPED_HOPELESS, STOPPED_COLLAPSED = "stopped_hopeless", "stopped_collapsed"
DIVERGED, FAILED, INTERRUPTED = "diverged", "failed", "interrupted"

# the run ended with metrics a recommendation may use: an early-stopped trial's kept checkpoint was measured in
# full like any other, and its evaluated checkpoints are candidates; the searcher is told its objectives
SCORED: tuple[str, ...] = (COMPLETED, STOPPED_AT_TARGET, STOPPED_HOPELESS, STOPPED_COLLAPSED)
BROKEN: tuple[str, ...] = (DIVERGED, FAILED)  # no usable metrics: told to the searcher as FAIL
FINISHED: tuple[str, ...] = SCORED + BROKEN  # the trial is over and will not run again
UNFINISHED: tuple[str, ...] = (RUNNING, INTERRUPTED)  # not an outcome (yet)
