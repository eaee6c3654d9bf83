"""The Ray Tune trainable: one trial, on one worker (`tuner.study.trial.run_trial`) or on Ray Train over several
(`tuner.study.multiworker.run_sharded_trial`, which runs `run_trial` on each rank). It sits above both so that
neither imports the other's caller."""

from __future__ import annotations

from typing import Any

from tuner.study.context import TrialContext
from tuner.study.trial import run_trial


def trainable(config: dict[str, Any], ctx: TrialContext, prepared: dict[str, Any]) -> None:
    """Ray Tune function trainable (bound with `tune.with_parameters(trainable, ctx=..., prepared=...)`).
    A trial of more than one worker runs on Ray Train inside this trial (`tuner.study.multiworker`)."""
    from ray import tune

    if ctx.workers > 1:
        from tuner.study.multiworker import run_sharded_trial

        run_sharded_trial(config, ctx, prepared, tune.report)
    else:
        run_trial(config, ctx, prepared, tune.report)
