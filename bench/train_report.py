"""What a curve point costs the ranks of a multi-worker trial: seconds per `ray.train.report` under Ray Train's
`TorchTrainer`, with Ray Train's default poll of the ranks (every 2 s) and with the poll a trial uses
(`tuner.study.multiworker.POLL_S`), in one run.

A rank's report waits until the controller has taken its previous one, which it does once per poll; ranks that
report every few steps then idle up to a poll interval each time. The rank function does nothing but report,
so the figure is the waiting alone.

    python bench/train_report.py                 # 2 ranks, 8 reports each
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from tuner.study.cluster import start_ray
from tuner.study.multiworker import POLL_ENV, POLL_S, torch_trainer

RAY_DEFAULT_S = "2.0"  # Ray Train's DEFAULT_HEALTH_CHECK_INTERVAL_S


def reports(config: dict) -> list[float]:
    """Every rank: `config["n"]` reports, each timed."""
    import ray.train

    waits = []
    for i in range(config["n"]):
        started = time.perf_counter()
        ray.train.report({"i": i})
        waits.append(time.perf_counter() - started)
    return waits


def timed(poll: str, ranks: int, n: int) -> tuple[float, list[float]]:
    """(the trainer's wall seconds, rank 0's seconds per report) with the controller polling every `poll` s."""
    os.environ[POLL_ENV] = poll
    started = time.perf_counter()
    result = torch_trainer(reports, {"n": n}, workers=ranks, cpus=0.5, gpus=0).fit()
    return time.perf_counter() - started, result.return_value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reports", type=int, default=8)
    args = ap.parse_args()
    start_ray(None)
    print(f"{args.ranks} ranks (CPU, gloo), {args.reports} reports each; rank 0's seconds per report")
    print("| poll of the ranks | trainer wall s | median s per report (after the first) | max |")
    print("| --- | ---: | ---: | ---: |")
    for label, poll in (("Ray Train's default", RAY_DEFAULT_S), ("a trial's (POLL_S)", POLL_S)):
        wall, waits = timed(poll, args.ranks, args.reports)
        print(f"| {label}, {poll} s | {wall:.1f} | {statistics.median(waits[1:]):.2f} | {max(waits):.2f} |")


if __name__ == "__main__":
    main()
