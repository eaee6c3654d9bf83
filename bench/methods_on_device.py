"""All seven methods on one device against the CPU: the CUDA path (fused AdamW, bf16 autocast, seeded
random-model init on the GPU) runs and moves the forget gap the same way as fp32 on the CPU.

    python bench/methods_on_device.py --device cuda        # micro testbed, 12 steps per method
"""

from __future__ import annotations

import argparse
import time

import torch

from tuner.engine import methods, testbed
from tuner.engine.data import build_data
from tuner.engine.models import Workbench
from tuner.engine.unlearn import UnlearnConfig, run_unlearning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="testbed:micro")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    bench = Workbench.open(args.model)
    data = build_data(testbed.data_spec(bench.source.testbed_root), bench.tokenizer, bench.reference.config)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"{args.model}, lr {args.lr}, {args.steps} steps, batch 8; device {name}, torch {torch.__version__}")
    print(f"{'method':<20} {'device':<6} {'precision':<9} {'status':<10} {'gap before':>10} {'gap after':>10} "
          f"{'util drop':>10} {'seconds':>8}")
    for method in methods.available():
        for device in ("cpu", args.device):
            cfg = UnlearnConfig(method=method, lr=args.lr, max_steps=args.steps, stop_at_target=False,
                                checkpoint="last", device=device)
            started = time.perf_counter()
            result = run_unlearning(bench.fresh(), data, cfg, reference=bench.reference)
            m = result.metrics or {}
            print(f"{method:<20} {device:<6} {result.environment['precision']:<9} {result.status:<10} "
                  f"{result.baseline['forget_gap']:>+10.3f} {m.get('forget_gap', float('nan')):>+10.3f} "
                  f"{m.get('utility_drop', float('nan')):>+10.3f} {time.perf_counter() - started:>8.2f}")


if __name__ == "__main__":
    main()
