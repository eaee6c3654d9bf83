"""Is `run.prune_hopeless` safe as a default? Replays the hopeless rule on curves run to their horizon.

A benchmark, not a test. On the micro testbed it runs a grid of trials (methods x learning rates) with the
early stops off and stop_at_target on, so each curve goes until it reaches the approximate-retraining point or
its horizon, evaluating the forget gap every `--eval-every` steps (utility only at the end: the rule does not
read it). Then it replays `tuner.engine.stopping.hopeless` on every
prefix of every curve, as a trial with the rule on would have judged it, and counts:

  pruned      trials the rule would have stopped (at the first prefix it calls hopeless);
  wrong       pruned trials whose full curve reached the band (|forget gap| <= gap_tolerance) later: the rule's
              errors, the figure that decides the default;
  saved       the training steps the pruned trials would not have run, as a share of all steps run.

    python bench/hopeless_replay.py        # ga, ga_gd, npo; 5 learning rates; 3 epochs of batch 32, linear decay
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tuner.core.precision import resolve_precision
from tuner.engine import testbed
from tuner.engine.data import build_data
from tuner.engine.evaluation import full_metrics
from tuner.engine.models import Workbench
from tuner.engine.stopping import hopeless
from tuner.engine.unlearn import UnlearnConfig, run_unlearning


def first_hopeless(curve: list[dict], horizon: int, tol: float) -> int | None:
    """The step at which a trial with the rule on would have stopped, or None."""
    for n in range(1, len(curve) + 1):
        points = curve[:n]
        if hopeless([p["step"] for p in points], [p["forget_gap"] for p in points], horizon, tol):
            return points[-1]["step"]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ga,ga_gd,npo")
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3,3e-3")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gap-tolerance", type=float, default=0.1)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench = Workbench.open("testbed:micro")
    data = build_data(testbed.data_spec(bench.source.testbed_root), bench.tokenizer, bench.reference.config)
    device = torch.device("cpu")
    baseline = full_metrics(bench.reference, data, 32, device, torch.float32)
    tol = args.gap_tolerance
    rows, started = [], time.perf_counter()
    for method in args.methods.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            cfg = UnlearnConfig(method=method, params={"lr": lr, "epochs": args.epochs}, device="cpu",
                                eval_every=args.eval_every, batch_size=args.batch_size, schedule=args.schedule,
                                eval_utility_every=10_000, prune_hopeless=False, stop_on_collapse=False)
            model, reference = bench.trainee(cfg, resolve_precision(cfg.precision, device))
            result = run_unlearning(model, data, cfg, reference=reference, baseline=baseline)
            curve = [pt for pt in result.curve if pt["step"] > 0 and math.isfinite(pt.get("forget_gap", math.nan))]
            reached = any(pt["forget_gap"] >= -tol for pt in curve)
            stop = first_hopeless(curve, result.planned_steps, tol)
            rows.append((method, lr, result.planned_steps, result.steps_done, reached, stop,
                         curve[-1]["forget_gap"] if curve else math.nan))
            print(f"{method:8s} lr {lr:8.1e}  horizon {result.planned_steps:4d}  ran {result.steps_done:4d}  "
                  f"final gap {rows[-1][-1]:+.3f}  reached band {reached!s:5s}  hopeless at {stop}", flush=True)
    pruned = [r for r in rows if r[5] is not None]
    wrong = [r for r in pruned if r[4]]
    ran = sum(r[3] for r in rows)
    saved = sum(r[3] - r[5] for r in pruned)
    print(f"\n{len(rows)} trials, {args.epochs:g} epochs of batch {args.batch_size}, eval every {args.eval_every} "
          f"steps, schedule "
          f"{args.schedule}: pruned {len(pruned)}, of which reached the band later {len(wrong)}; "
          f"steps saved {saved}/{ran} ({saved / max(1, ran):.0%}); {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
