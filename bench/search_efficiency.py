"""Search efficiency: Optuna's multi-objective samplers against the paper-style grid and random search.

Every trial is a real unlearning run on the micro testbed through the same trial code the studies use
(`tuner.study.trial.run_trial`, here called in-process so Ray's scheduling does not blur the comparison).
Prints hypervolume (|forget gap|, utility drop; reference point stated) reached after n trials, per sampler,
averaged over seeds, and the share of the grid's final hypervolume.

    python bench/search_efficiency.py                # ga_gd on testbed:micro, 3 seeds, 15 trials per seed
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import optuna

from tuner.core.hparams import EPOCHS, LR, RETAIN_WEIGHT
from tuner.core.settings import RunSettings
from tuner.study.context import TrialContext
from tuner.study.spec import StudySpec
from tuner.study.trial import prepare, run_trial


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` (both minimised) inside the box bounded by `ref`."""
    inside = sorted((a, b) for a, b in points if a < ref[0] and b < ref[1])
    front, best_b = [], math.inf
    for a, b in inside:
        if b < best_b:
            front.append((a, b))
            best_b = b
    area = 0.0
    for i, (a, b) in enumerate(front):
        right = front[i + 1][0] if i + 1 < len(front) else ref[0]
        area += (right - a) * (ref[1] - b)
    return area


def evaluate(params: dict, study: TrialContext, prepared: dict) -> tuple[float, float]:
    final = run_trial({**params, "unit": next(iter(study.units))}, study, prepared, lambda _result: None)
    if final.broken:
        return math.inf, math.inf
    return final.objectives["forget_gap"], final.objectives["utility_drop"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed:micro")
    ap.add_argument("--method", default="ga_gd")
    ap.add_argument("--trials", type=int, default=15, help="trials per seed for each sampler (grid: 45)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the trials run (cpu, cuda)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lr_lo, lr_hi, rw_lo, rw_hi = 1e-4, 3e-3, 0.3, 3.0
    study = TrialContext.of(StudySpec(name="search-efficiency", model=args.model, methods=[args.method],
                                      retain_sources=["in_distribution"], run=RunSettings(device=args.device)))
    prepared = prepare(study)
    cache: dict[tuple, tuple[float, float]] = {}

    def cached(lr: float, epochs: int, rw: float) -> tuple[float, float]:
        key = (round(math.log10(lr), 6), epochs, round(math.log10(rw), 6))
        if key not in cache:
            cache[key] = evaluate({LR.name: lr, EPOCHS.name: epochs, RETAIN_WEIGHT.name: rw}, study, prepared)
        return cache[key]

    started = time.perf_counter()
    grid_lrs = [lr_lo * (lr_hi / lr_lo) ** (i / 4) for i in range(5)]
    grid = [cached(lr, e, rw) for lr, e, rw in itertools.product(grid_lrs, (1, 2, 3), (0.3, 1.0, 3.0))]
    baseline_gap = abs(prepared["baseline"]["forget_gap"])
    ref = (baseline_gap, 1.0)  # doing nothing, and one nat of utility lost

    def curve(points: list[tuple[float, float]]) -> list[float]:
        return [hypervolume_2d(points[: n + 1], ref) for n in range(len(points))]

    grid_hv = curve(grid)[-1]
    results: dict[str, list[list[float]]] = {}
    for name in ("tpe", "nsga2", "random"):
        results[name] = []
        for seed in range(args.seeds):
            sampler = {"tpe": optuna.samplers.TPESampler(multivariate=True, n_startup_trials=4, seed=seed),
                       "nsga2": optuna.samplers.NSGAIISampler(population_size=5, seed=seed),
                       "random": optuna.samplers.RandomSampler(seed=seed)}[name]
            ost = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
            points = []
            for _ in range(args.trials):
                t = ost.ask()
                values = cached(t.suggest_float(LR.name, lr_lo, lr_hi, log=True), t.suggest_int(EPOCHS.name, 1, 3),
                                t.suggest_float(RETAIN_WEIGHT.name, rw_lo, rw_hi, log=True))
                if math.isfinite(values[0]):
                    ost.tell(t, list(values))
                else:
                    ost.tell(t, state=optuna.trial.TrialState.FAIL)
                points.append(values)
            results[name].append(curve(points))
    print(f"method {args.method} on {args.model} ({args.device}); hypervolume of (|forget gap|, utility drop) "
          f"w.r.t. reference ({ref[0]:.3f}, {ref[1]:.1f}); {len(cache)} distinct unlearning runs in "
          f"{time.perf_counter() - started:.0f} s")
    print(f"grid 5 lr x 3 epochs x 3 λ = 45 trials: final hypervolume {grid_hv:.4f}")
    checkpoints = [n for n in (5, 10, 15, 20, 30, 45) if n <= args.trials]
    print("sampler  " + "  ".join(f"n={n:<3d}" for n in checkpoints) + "   (mean over seeds, share of grid final)")
    for name, runs in results.items():
        cells = []
        for n in checkpoints:
            mean = statistics.mean(r[n - 1] for r in runs)
            cells.append(f"{mean / grid_hv:6.1%}" if grid_hv > 0 else "  n/a ")
        print(f"{name:<8} " + "  ".join(cells))
    grid_curve = curve(grid)
    print("grid     " + "  ".join(f"{grid_curve[n - 1] / grid_hv:6.1%}" for n in checkpoints) + "   (grid order)")
    last = args.trials
    verdict = statistics.mean(r[last - 1] for r in results["tpe"]) / grid_hv if grid_hv > 0 else float("nan")
    print(f"goal: >= 95% of the grid's final hypervolume with <= 15 trials (a third of 45): "
          f"TPE reaches {verdict:.1%} at n={last}")


if __name__ == "__main__":
    main()
