"""The Ray Tune trainable: one trial, on one worker (`tuner.study.trial.run_trial`) or on Ray Train over several
(`tuner.study.multiworker.run_sharded_trial`, which runs `run_trial` on each rank). It sits above both so that
neither imports the other's caller."""

from __future__ import annotations

from typing import Any

from tuner.study.context import TrialContext
from tuner.study.report import CurveReport, TrialReport
from tuner.study.trial import run_trial


def trainable(config: dict[str, Any], ctx: TrialContext, prepared: dict[str, Any]) -> None:
    """Ray Tune function trainable (bound with `tune.with_parameters(trainable, ctx=..., prepared=...)`).
    A trial of more than one worker runs on Ray Train inside this trial (`tuner.study.multiworker`)."""

    if ctx.workers > 1:
        from tuner.study.multiworker import run_sharded_trial

        run_sharded_trial(config, ctx, prepared, to_tune)
    else:
        run_trial(config, ctx, prepared, to_tune)


def to_tune(report: CurveReport | TrialReport) -> None:
    """A trial's report, handed to Ray Tune as the flat dict it records and shows its searcher."""
    from ray import tune

    tune.report(report.to_tune())
