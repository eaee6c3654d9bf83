"""Orchestration overhead: what the service (Ray Tune, Optuna, the store) adds per trial beyond the trial's
own unlearning and evaluation.

Runs a real study on the testbed (one search unit, trials one at a time so times add up), then reads the
store: each trial's own time is `wall_time_s` measured inside `run_unlearning`; the rest of the time between
the first trial's start and the last trial's end is overhead (scheduling, reporting, database writes, the
worker's one-time model load). Ray start-up before the first trial is reported separately.

    python bench/orchestration_overhead.py            # 8 trials of ga_gd on testbed:micro
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from tuner.orchestrator import run_study
from tuner.spec import load_spec
from tuner.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed:micro")
    ap.add_argument("--method", default="ga_gd")
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    spec_path = tmp / "study.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "overhead", "model": args.model, "methods": [args.method], "retain_sources": ["in_distribution"],
        "budget": {"trials": args.trials}, "concurrency": 1, "run": {"device": "cpu"},
        "search": {"lr": {"low": 1e-4, "high": 1e-3}, "epochs": {"low": 1, "high": 3}}}))
    spec, text = load_spec(spec_path)
    store = Store(f"sqlite:///{tmp / 'overhead.db'}")
    started = time.time()
    run_study(spec, text, store)
    ended = time.time()
    with store.sessions() as s:
        from sqlalchemy import select

        from tuner.store.schema import Trial
        trials = list(s.scalars(select(Trial).order_by(Trial.started_at)))
    first = trials[0].started_at.timestamp()
    last = max(t.finished_at.timestamp() for t in trials)
    own = sum(t.wall_time_s or 0.0 for t in trials)
    n = len(trials)
    per_trial = (last - first - own) / n
    print(f"{n} trials of {args.method} on {args.model}, one at a time")
    print(f"study wall time            {ended - started:7.1f} s")
    print(f"  Ray start-up before trial 1 {first - started:5.1f} s (once per study)")
    print(f"  trials' own time           {own:7.1f} s  ({own / n:.2f} s per trial: unlearning + evaluation)")
    print(f"  overhead between/around     {last - first - own:6.1f} s  ({per_trial:.2f} s per trial, "
          f"{per_trial / (own / n):.1%} of a trial; includes the worker's one-time model load)")
    steady = [(t.finished_at.timestamp() - prev.finished_at.timestamp()) - (t.wall_time_s or 0.0)
              for prev, t in zip(trials, trials[1:], strict=False)]
    if steady:
        mean = sum(steady) / len(steady)
        print(f"  steady state (trials 2..{n})   {mean:.2f} s per trial, {mean / (own / n):.1%} of a trial "
              "(after the worker has loaded the model)")
    print("goal: under 5% and under 1 s per trial")


if __name__ == "__main__":
    main()
