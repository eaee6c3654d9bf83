"""Orchestration overhead: what the service (Ray Tune, Optuna, the store) adds per trial beyond the trial's
own unlearning and evaluation.

Runs a real study on the testbed (one search unit, trials one at a time so times add up), then reads the
store: each trial's own time is `wall_time_s` measured inside `run_unlearning`; the rest of the time between
the first trial's start and the last trial's end is overhead (scheduling, reporting, database writes, the
worker's one-time model load). What happens once per study before the first trial (Ray start-up, and
tokenising the data and evaluating the original and exact-retrain models in a Ray task) is reported
separately.

    python bench/orchestration_overhead.py     # 3 units (ga_gd, ga, ga_kl) x 4 trials on testbed:micro
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from tuner.core.hparams import EPOCHS, LR
from tuner.store import Store
from tuner.study.orchestrator import run_study
from tuner.study.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed:micro")
    ap.add_argument("--methods", default="ga_gd,ga,ga_kl", type=lambda v: v.split(","),
                    help="comma-separated; each is one search unit, all in one Tune run")
    ap.add_argument("--trials", type=int, default=4, help="trials per search unit")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    spec_path = tmp / "study.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "overhead", "model": args.model, "methods": args.methods, "retain_sources": ["in_distribution"],
        "budget": {"trials": args.trials}, "concurrency": 1, "run": {"device": "cpu"},
        "search": {LR.name: {"low": 1e-4, "high": 1e-3}, EPOCHS.name: {"low": 1, "high": 3}}}))
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
    n = len(trials)
    own = [t.wall_time_s or 0.0 for t in trials]
    ends = [t.finished_at.timestamp() for t in trials]
    gaps = [ends[0] - first - own[0]] + [ends[i] - ends[i - 1] - own[i] for i in range(1, n)]
    mean_own = sum(own) / n
    steady = sum(gaps[1:]) / (n - 1)
    worker_start = gaps[0] - steady
    amortised = sum(gaps) / n
    units = len({t.search_id for t in trials})
    print(f"{n} trials ({units} search units: {', '.join(args.methods)}) on {args.model}, one at a time")
    print(f"study wall time                {ended - started:7.1f} s")
    print(f"  once per study, before trial 1 {first - started:5.1f} s  (Ray start-up; tokenising and evaluating "
          "the original and exact-retrain models in one Ray task)")
    print(f"  once per worker, in trial 1    {worker_start:5.1f} s  (worker process, imports, base-model load)")
    print(f"  trials' own time             {sum(own):7.1f} s  ({mean_own:.2f} s per trial: unlearning + evaluation)")
    print(f"  per-trial overhead           {steady:7.2f} s  ({steady / mean_own:.1%} of a trial: scheduling, "
          "Optuna ask/tell, store writes, fresh weights; mean of trials 2..n)")
    print(f"  largest gap after trial 1    {max(gaps[1:]):7.2f} s  (a worker restart between units would show "
          "here)")
    print(f"  amortised over this run      {amortised:7.2f} s per trial ({amortised / mean_own:.1%}, worker start "
          "included)")
    print("goal: under 5% and under 1 s per trial")

if __name__ == "__main__":
    main()
