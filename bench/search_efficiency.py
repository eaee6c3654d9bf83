"""Search efficiency, in two parts.

`--part defaults` (issue 25): the study's search as it was (TPE whose first trials are random draws, over the
declared ranges) against the calibrated search (`tuner.study.calibration`: the lr range test narrows the lr
window, the guideline points and a Sobol spread run first; TPE or the GP after them), per method and seed:
trials and wall time to the first trial that ends in the target band within the utility tolerance (its kept
checkpoint measured in full: `tuner.results.recommend.succeeded`), and the hypervolume each arm has at the
wall time the faster arm needed for its whole budget. The calibration's run counts in the wall time, not as
a trial. Trials and calibrations run in this process, one after another, through the code a study's Ray
workers run (`run_trial`, `calibrate`, `unit_search`), so Ray's scheduling does not blur the comparison.

    python bench/search_efficiency.py --part defaults --model testbed:micro --methods ga_gd npo --seeds 5

`--part samplers`: Optuna's multi-objective samplers against the paper-style grid and random search.

Every trial is a real unlearning run on the micro testbed through the same trial code the studies use
(`tuner.study.trial.run_trial`, here called in-process so Ray's scheduling does not blur the comparison).
Prints hypervolume (|forget gap|, utility drop; reference point stated) reached after n trials, per sampler,
averaged over seeds, and the share of the grid's final hypervolume.

    python bench/search_efficiency.py --part samplers   # ga_gd on testbed:micro, 3 seeds, 15 trials per seed
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field

import optuna

from tuner.core.hparams import EPOCHS, LR, RETAIN_WEIGHT
from tuner.core.settings import RunSettings
from tuner.results.recommend import succeeded
from tuner.study import calibration
from tuner.study.context import TrialContext
from tuner.study.search import SearchSpaceFn, UnitSearch, make_sampler, open_study, unit_search
from tuner.study.spec import StudySpec, unit_name
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


@dataclass
class Arm:
    """One way of searching a unit: its sampler and whether the calibration runs first."""

    name: str
    sampler: str
    calibrated: bool


ARMS = (Arm("before: tpe, random start, declared ranges", "tpe", False),
        Arm("calibrated + tpe", "tpe", True),
        Arm("calibrated + gp", "gp", True))


@dataclass
class Run:
    """One arm's search of one unit at one seed: per trial, the wall time since the search began when it ended,
    whether it succeeded, and its objectives (None when broken)."""

    ends: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    values: list[tuple[float, float] | None] = field(default_factory=list)
    calibration_s: float = 0.0
    window: str = ""

    def first_hit(self) -> tuple[int, float] | None:
        """(trials, wall seconds) up to the first trial that succeeded; None when none did."""
        return next(((i + 1, self.ends[i]) for i, hit in enumerate(self.hits) if hit), None)

    def hypervolume(self, until: float, ref: tuple[float, float]) -> float:
        return hypervolume_2d([v for v, end in zip(self.values, self.ends, strict=True)
                               if v is not None and end <= until], ref)


def search_unit(arm: Arm, method: str, seed: int, args: argparse.Namespace, ctx: TrialContext,
                prepared: dict) -> Run:
    """The arm's whole search of `method` (budget `args.trials`), trials one after another."""
    spec = StudySpec(name="search-efficiency", model=args.model, methods=[method], retain_sources=["in_distribution"],
                     seed=seed, budget={"trials": args.trials}, sampler={"name": arm.sampler},
                     calibration={"enabled": arm.calibrated}, run=RunSettings(device=args.device))
    unit = unit_name(method, "in_distribution")
    depth = (prepared["data_summary"].get("model") or {}).get("layers")
    run, started = Run(), time.perf_counter()
    narrowed, guideline = {}, []
    if arm.calibrated:
        ranges = spec.space_for(method, depth)
        params = calibration.run_params(method, ranges, depth)
        measured = calibration.calibrate(unit, params, ranges[LR.name].low, ranges[LR.name].high, spec.calibration,
                                         ctx, prepared)
        rec = calibration.record(measured, ranges[LR.name].low, ranges[LR.name].high, ctx, params)
        run.calibration_s, run.window = time.perf_counter() - started, rec["summary"]
        if calibration.refused(rec):
            return run
        narrowed, guideline = calibration.narrowed(rec), calibration.guideline_points(rec)
    storage = optuna.storages.InMemoryStorage()
    if arm.calibrated:  # the study's own search: guideline points and the Sobol spread enqueued first
        search = unit_search(spec, method, "bench", storage, depth, narrowed, guideline)
    else:  # as before: the sampler's own random start-up draws
        study = open_study(storage, "bench", make_sampler(spec.sampler, args.trials, seed), list(ctx.objectives))
        search = UnitSearch(study, SearchSpaceFn(spec, method, depth), list(ctx.objectives), spec.retries)
    rule = ctx.rule(prepared["exact_retrain"])
    for number in range(args.trials):
        final = run_trial({**search.suggest(str(number)), "unit": unit}, ctx, prepared, lambda _result: None)
        search.complete(str(number), final, error=False)  # told as a study tells it (FAIL when broken)
        values = None if final.broken else tuple(final.objectives.get(o, math.nan) for o in ctx.objectives)
        run.values.append(values if values is not None and all(math.isfinite(v) for v in values) else None)
        run.ends.append(time.perf_counter() - started)
        run.hits.append(bool(succeeded({"status": final.status, "metrics": final.metrics or {}}, rule)))
    return run


def defaults_part(args: argparse.Namespace) -> None:
    ctx = TrialContext.of(StudySpec(name="search-efficiency", model=args.model, methods=list(args.methods),
                                    retain_sources=["in_distribution"], run=RunSettings(device=args.device)))
    prepared = prepare(ctx)
    ref = (abs(prepared["baseline"]["forget_gap"]), 1.0)
    started = time.perf_counter()
    runs: dict[tuple[str, str, int], Run] = {}
    for method in args.methods:
        for seed in range(args.seeds):
            for arm in arms(args):
                runs[arm.name, method, seed] = run = search_unit(arm, method, seed, args, ctx, prepared)
                hit = run.first_hit()
                print(f"{method} seed {seed} {arm.name}: first success "
                      f"{f'trial {hit[0]} at {hit[1]:.1f} s' if hit else 'none'}; "
                      f"{len(run.ends)} trials in {run.ends[-1] if run.ends else run.calibration_s:.1f} s"
                      + (f"; {run.window}" if run.window else ""), flush=True)
    print(f"\n{args.model} ({args.device}), {args.trials} trials per unit, seeds 0..{args.seeds - 1}; "
          f"hypervolume of (|forget gap|, utility drop) w.r.t. ({ref[0]:.3f}, {ref[1]:.1f}); "
          f"{time.perf_counter() - started:.0f} s in all")
    before = ARMS[0].name
    print("| method | arm | reached (of seeds) | median trials to first | median s to first | "
          "median HV at equal time | trials ratio | time ratio | HV ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method in args.methods:
        base = summary(runs, before, method, args, ref)
        for arm in arms(args):
            row = summary(runs, arm.name, method, args, ref)
            ratios = ("", "", "") if arm.name == before else (
                ratio(base["trials"], row["trials"]), ratio(base["time"], row["time"]), ratio(row["hv"], base["hv"]))
            print(f"| {method} | {arm.name} | {row['reached']}/{args.seeds} | {row['trials']:.1f} | "
                  f"{row['time']:.1f} | {row['hv']:.4f} | {' | '.join(ratios)} |")
    print("trials and time ratios: before / arm (2 = half the trials or time); HV ratio: arm / before. A seed "
          "that never succeeds (or whose calibration found no window) counts as never (inf): a median of inf "
          "means most seeds did not succeed.")


def arms(args: argparse.Namespace) -> tuple[Arm, ...]:
    """The arms run: the search as it was always, then those of `--arms` (all by default)."""
    return (ARMS[0], *(a for a in ARMS[1:] if args.arms is None or a.sampler in args.arms))


def summary(runs: dict, arm: str, method: str, args: argparse.Namespace, ref: tuple[float, float]) -> dict:
    """Medians over seeds: trials and seconds to the first success (inf for a seed without one), and the
    hypervolume at the time the faster of the arms of that seed needed for its whole search."""
    trials, times, hvs = [], [], []
    for seed in range(args.seeds):
        run = runs[arm, method, seed]
        hit = run.first_hit() or (math.inf, math.inf)
        trials.append(hit[0])
        times.append(hit[1])
        equal = min((r.ends[-1] if r.ends else r.calibration_s) for (_, m, s), r in runs.items()
                    if m == method and s == seed)
        hvs.append(run.hypervolume(equal, ref))
    return {"reached": sum(math.isfinite(t) for t in trials), "trials": statistics.median(trials),
            "time": statistics.median(times), "hv": statistics.median(hvs)}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and math.isfinite(a) and math.isfinite(b) else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("defaults", "samplers"), default="defaults")
    ap.add_argument("--model", default="testbed:micro")
    ap.add_argument("--method", default="ga_gd", help="samplers: the method searched")
    ap.add_argument("--methods", nargs="+", default=["ga_gd", "npo"], help="defaults: the methods searched")
    ap.add_argument("--trials", type=int, default=None,
                    help="trials per seed and arm (defaults: 8; samplers: 15, the grid 45)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (defaults: 5; samplers: 3)")
    ap.add_argument("--device", default="cpu", help="where the trials run (cpu, cuda)")
    ap.add_argument("--arms", nargs="+", choices=("tpe", "gp"), default=None,
                    help="defaults: the calibrated arms to run beside the search as it was (default: both)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.part == "defaults":
        args.trials, args.seeds = args.trials or 8, args.seeds or 5
        defaults_part(args)
        return
    args.trials, args.seeds = args.trials or 15, args.seeds or 3
    samplers_part(args)


def samplers_part(args: argparse.Namespace) -> None:
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
