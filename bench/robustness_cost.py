"""What the robustness checks would add to a study: one unlearning trial against the checks at their defaults.

A benchmark, not a test. On a testbed (micro by default; `--testbed small` for the Llama one), in one process,
no Ray, everything on the same model and data:

  trial      one `run_unlearning` as a study runs it (the original model's metrics computed once beforehand,
             as `tuner.study.trial.prepare` does): `--method` at its default epochs, `--lr`, the run defaults
             (evaluation ~10 times per run, stop at the target, best checkpoint).
  relearn    `tuner.engine.robustness.relearn` on the trial's model at `RelearnSettings()` defaults (10 AdamW steps,
             batch 8, one half of the forget blocks as attack text, a curve point every 2 steps).
  quantize   `tuner.engine.robustness.quantized_metrics` at 4 and 8 bits (torchao, round-to-nearest, group 128).
  reference  the same relearning attack on the testbed's exact-retrain model: once per study, not per trial.

Every part runs `--repeats` times, the parts alternating, and the table gives medians: each part's wall time
and what the per-trial checks would add to a trial (their time over the trial's), plus the per-study reference
amortised over `--trials` trials. Seed spread costs whole trials (one per extra seed), so it is stated, not
timed. Wall clock; on CUDA synchronised at both ends of each part.

    python bench/robustness_cost.py                     # micro testbed, CPU
    python bench/robustness_cost.py --testbed small --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from tuner.core.precision import resolve_precision
from tuner.engine import methods, testbed
from tuner.engine.data import build_data
from tuner.engine.evaluation import full_metrics
from tuner.engine.memory import resolve_eval_batch
from tuner.engine.models import Workbench
from tuner.engine.robustness import QUANT, RELEARN, default_eval_every, load_exact_retrain, quantized_metrics, relearn
from tuner.engine.unlearn import UnlearnConfig, resolve_device, run_unlearning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--testbed", choices=list(testbed.SIZES), default="micro")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--method", default="ga_gd")
    p.add_argument("--lr", type=float, default=1e-4, help="the trial's learning rate")
    p.add_argument("--trials", type=int, default=50, help="trials of a study, to amortise the once-per-study part")
    p.add_argument("--repeats", type=int, default=3, help="runs of every part; the table gives the medians")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p.parse_args(argv)


def timed(on: torch.device, fn, *args, **kwargs):
    """(result, seconds) of one call, CUDA synchronised at both ends."""
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    dtype = precision.compute
    bench = Workbench.open(f"testbed:{args.testbed}", dtype=dtype)
    bench.original.to(device)
    data = build_data(testbed.data_spec(bench.source.testbed_root), bench.tokenizer, bench.reference.config)
    cfg = UnlearnConfig(method=args.method, lr=args.lr, device=str(device))
    print(f"testbed {args.testbed} | {sum(p.numel() for p in bench.original.parameters()) / 1e6:.2f}M params | "
          f"device {device} ({torch.get_num_threads()} threads) | precision {precision.name} | "
          f"blocks {data.summary()} x {data.block_size} tokens")

    batch = resolve_eval_batch(cfg, bench.reference.config, [methods.get(cfg.method)], precision.name, data.block_size)
    baseline = full_metrics(bench.reference, data, batch, device, dtype)  # once per study
    retrain = load_exact_retrain(bench.source.retrain_path, dtype).to(device)
    evaluation = dict(device=device, dtype=dtype, eval_batch_size=batch)
    times: dict[str, list[float]] = {k: [] for k in ("trial", "train", "eval", "relearn", "quant", "reference")}
    for _ in range(args.repeats):  # the parts alternate, so a shared machine's load hits each of them
        model, reference = bench.trainee(cfg, precision)
        result, seconds = timed(device, run_unlearning, model, data, cfg, reference=reference, baseline=baseline)
        times["trial"].append(seconds)
        times["train"].append(result.train_time_s)
        times["eval"].append(result.eval_time_s)
        candidate = copy.deepcopy(model).eval()
        attack, seconds = timed(device, relearn, candidate, data, seed=cfg.seed, **evaluation)
        times["relearn"].append(seconds)
        quant, seconds = timed(device, quantized_metrics, candidate, data, QUANT.bits, baseline=baseline,
                               unquantized=result.metrics, **evaluation)
        times["quant"].append(seconds)
        exact, seconds = timed(device, relearn, retrain, data, seed=cfg.seed, **evaluation)
        times["reference"].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    trial_s, relearn_s, quant_s, reference_s = med["trial"], med["relearn"], med["quant"], med["reference"]

    points = len(attack["curve"])
    print(f"trial: {cfg.method} lr {cfg.lr:g}, {result.steps_done}/{result.planned_steps} steps ({result.status}), "
          f"batch {cfg.batch_size}, {len(result.curve) - 1} curve points")
    print(f"relearn: {RELEARN.steps} steps at lr {RELEARN.lr:g}, batch {RELEARN.batch_size}, "
          f"{attack['attack_blocks']} attack / {attack['eval_blocks']} evaluation blocks, {points} curve points "
          f"(every {default_eval_every(RELEARN.steps)} steps)")
    print()
    per_trial = relearn_s + quant_s
    amortised = reference_s / args.trials
    print(f"medians of {args.repeats} runs, the parts alternating")
    print(f"{'part':<40}{'seconds':>10}{'x trial':>10}")
    for label, seconds in (("trial (train + evaluate)", trial_s),
                           ("  of which training", med["train"]),
                           ("  of which evaluation", med["eval"]),
                           ("relearning attack (per trial)", relearn_s),
                           ("4- and 8-bit quantization (per trial)", quant_s),
                           ("retrain reference attack (per study)", reference_s),
                           (f"  amortised over {args.trials} trials", amortised)):
        print(f"{label:<40}{seconds:>10.2f}{seconds / trial_s:>10.2f}")
    print()
    print(f"robustness adds per trial: {per_trial / trial_s:.0%} of a trial "
          f"({(per_trial + amortised) / trial_s:.0%} with the amortised reference); a study that runs every "
          f"trial's checks takes {(trial_s + per_trial + amortised) / trial_s:.2f}x as long")
    print("seed spread: each extra seed is one more trial (x1.00 per seed, plus its own checks if run)")
    print()
    print(f"figures: forget gap {result.metrics['forget_gap']:+.4f} | relearn gap {attack['relearn_gap_before']:+.4f} "
          f"-> {attack['relearn_gap']:+.4f}, drop {attack['relearn_drop']:.4f} (retrain: {exact['relearn_drop']:.4f}) | "
          f"quant4 gap {quant['quant4_gap']:+.4f}, quant8 gap {quant['quant8_gap']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
