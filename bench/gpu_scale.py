"""Precision at a real model's shape: `mixed` (the default on GPUs) and `bf16` with stochastic rounding against
the old pure-bf16 path (torch's AdamW directly on bf16 weights, which is what loading a bf16 hub checkpoint
without a precision setting did).

A benchmark, not a test. The model is built from a config (Llama-3.2-1B's shape on a GPU, a small Llama on
CPU), saved in bf16 like a hub checkpoint, with the micro testbed's tokenizer; the forget, unseen and retain
sets are standard-library modules, so nothing is downloaded. Each path runs `--steps` steps of gradient ascent
(`ga`) at `--lr` (the paper's 2e-5 by default) through `tuner.engine.unlearn.run_unlearning` in this process (no Ray),
except the old path, which runs the same loss through `tuner.engine.training.run_loop` with torch's AdamW on the
bf16 weights. Printed per path:

  changed/step   share of the trainable weights whose value changed in the first optimiser step
  mean |dw|      mean absolute change of a weight in that step (fp32 view)
  forget NLL     movement of the forget set's mean NLL over the run (the unlearning actually done)
  tokens/s       training tokens per second (evaluation excluded)
  peak / plan    measured peak memory (CUDA max_memory_allocated) against the memory plan (CUDA only)

    python bench/gpu_scale.py                 # preset auto: gpu on a CUDA device, else cpu
    python bench/gpu_scale.py --preset gpu --steps 6
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from tuner.core.precision import resolve_precision
from tuner.engine import memory, methods, testbed
from tuner.engine.data import DataSpec, TextSource, build_data
from tuner.engine.evaluation import token_nll
from tuner.engine.methods.base import nll_term
from tuner.engine.models import Workbench
from tuner.engine.training import IndexStream, LossOut, run_loop
from tuner.engine.unlearn import UnlearnConfig, run_unlearning

PRESETS: dict[str, dict] = {
    # Llama-3.2-1B: 1.24B params, vocab 128256, GQA 32/8, tied embeddings; 8 x 2048 tokens per step.
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, block=2048,
                batch=8, eval_batch=8, steps=6, files=60, eval_blocks=64),
    # The same architecture, small enough for a 2-core CPU.
    "cpu": dict(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=1024, vocab=32000, block=256, batch=4,
                eval_batch=8, steps=3, files=8, eval_blocks=24),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    p.add_argument("--steps", type=int, help="optimiser steps per path (default: the preset's)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--paths", default="mixed,bf16,old-bf16", help="comma-separated: mixed, bf16, old-bf16, fp32")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.preset = ("gpu" if cuda else "cpu") if args.preset == "auto" else args.preset
    args.device = torch.device("cuda" if cuda else "cpu")
    args.size = PRESETS[args.preset]
    args.steps = args.steps or args.size["steps"]
    return args


def build_checkpoint(size: dict, tokenizer, root: Path, device: str = "cpu") -> Path:
    """A hub-like checkpoint: a Llama built from a config (initialised on `device`: a 1B init on the host takes a
    while), saved in bf16 with the testbed's tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=max(2048, size["block"]), tie_word_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def stdlib_sets(size: dict, root: Path) -> DataSpec:
    """Forget, unseen and retain sets of standard-library modules (disjoint), as plain directories."""
    files = testbed.stdlib_files()
    n = size["files"]
    spec = {}
    for i, role in enumerate(("forget", "unseen", "retain")):
        folder = root / "data" / role
        folder.mkdir(parents=True)
        for path in files[i * n:(i + 1) * n]:
            (folder / path.name).write_bytes(path.read_bytes())
        spec[role] = TextSource(path=str(folder))
    return DataSpec(**spec, block_size=size["block"], max_eval_blocks=size["eval_blocks"])


def weights_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def step_change(before: list[torch.Tensor], model: torch.nn.Module) -> tuple[float, float]:
    """(share of weights changed, mean |dw|) between `before` and the model's trainable weights now."""
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    changed = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True))
    total = sum(b.numel() for b in before)
    moved = sum(float((a.float() - b.float()).abs().sum()) for a, b in zip(after, before, strict=True))
    return changed / total, moved / total


def forget_nll(model, data, size, device, dtype) -> float:
    return float(token_nll(model, data.forget, size["eval_batch"], device, dtype).mean())


def run_tuner_path(name: str, args, source: Path, data) -> dict:
    """mixed / bf16 / fp32 through `run_unlearning`, as a trial runs."""
    device, size = args.device, args.size
    plan = resolve_precision(name, device)
    bench = Workbench.open(str(source), dtype=plan.compute)
    bench.original.to(device)
    cfg = UnlearnConfig(method="ga", lr=args.lr, max_steps=args.steps, precision=name, batch_size=size["batch"],
                        eval_batch_size=size["eval_batch"], stop_at_target=False, checkpoint="last",
                        eval_every=args.steps, warmup_ratio=0.0, device=str(device))
    model, reference = bench.trainee(cfg, plan)
    start_nll = forget_nll(model, data, size, device, plan.compute)
    before = weights_of(model.to(device))
    first: dict[str, float] = {}

    def on_progress(step: int, total: int, logs: dict) -> None:
        if step == 1:
            first["changed"], first["mean_dw"] = step_change(before, model)
            before.clear()

    result = run_unlearning(model, data, cfg, reference=reference, on_progress=on_progress)
    mem = result.environment["memory"]
    row = {"path": name, "weights": result.environment["weights_dtype"], "optimizer": result.environment["optimizer"],
           **first, "forget_nll_moved": result.metrics["forget_nll"] - start_nll,
           "forget_gap": result.metrics["forget_gap"],
           "tokens_per_s": result.train_tokens / max(result.train_time_s, 1e-9),
           "peak_gib": mem["peak_gib"], "plan_gib": mem["plan_gib"]["total"]}
    return row


def run_old_path(args, source: Path, data) -> dict:
    """The path `precision` replaced: the checkpoint loads in bf16 and torch's AdamW steps the bf16 weights."""
    from tuner.engine.training import OptimConfig

    device, size = args.device, args.size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).to(device).train()
    start_nll = forget_nll(model, data, size, device, torch.bfloat16)
    cfg = OptimConfig(lr=args.lr, warmup_ratio=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    stream = IndexStream(data.forget.shape[0], 0)
    before = weights_of(model)
    first: dict[str, float] = {}

    def micro_loss(step: int, micro: int) -> LossOut:
        return LossOut(-nll_term(model, data.forget[stream.take(size["batch"])].to(device)))

    def after_step(step: int, logs: dict) -> bool:
        if step == 1:
            first["changed"], first["mean_dw"] = step_change(before, model)
            before.clear()
        return False

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_loop(model, micro_loss, args.steps, 1, cfg, device, torch.bfloat16, after_step, optimizer=optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = memory.measured_peak(device)
    shape = memory.ModelShape.from_config(model.config)
    run = memory.RunShape(precision="bf16", batch_size=size["batch"], block_size=size["block"],
                          gpu=device.type == "cuda")
    planned = memory.plan(shape, run)
    return {"path": "old-bf16", "weights": "bfloat16", "optimizer": "torch.optim.AdamW", **first,
            "forget_nll_moved": forget_nll(model, data, size, device, torch.bfloat16) - start_nll,
            "tokens_per_s": args.steps * size["batch"] * size["block"] / seconds,
            "peak_gib": round(peak / memory.GIB, 3) if peak is not None else None,
            # the old path had no plan; this is what the bf16 plan (minus the SR optimizer's states) says
            "plan_gib": round((planned.total - planned.parts["original"]) / memory.GIB, 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.size
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"device {name} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"preset {args.preset}: Llama hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}, "
          f"batch {size['batch']} x {size['block']} | ga at lr {args.lr}, {args.steps} steps", flush=True)
    methods.get("ga")
    tokenizer = Workbench.open("testbed:micro").tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = build_checkpoint(size, tokenizer, root)
        data = build_data(stdlib_sets(size, root), tokenizer, transformers.AutoConfig.from_pretrained(source))
        print(f"checkpoint saved in bf16; forget {data.forget.shape[0]} blocks, unseen {data.unseen.shape[0]}",
              flush=True)
        for path in args.paths.split(","):
            row = run_old_path(args, source, data) if path == "old-bf16" else run_tuner_path(path, args, source, data)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| path | weights | optimizer | changed/step | mean abs dw | forget NLL moved | tokens/s | peak GiB | "
          "plan GiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['path']} | {r['weights']} | {r['optimizer']} | {r['changed']:.1%} | {r['mean_dw']:.2e} | "
              f"{r['forget_nll_moved']:+.5f} | {r['tokens_per_s']:,.0f} | {peak} | {r['plan_gib']:.1f} |")
    by = {r["path"]: r for r in rows}
    if "mixed" in by and "old-bf16" in by and by["old-bf16"]["forget_nll_moved"]:
        print(f"\nforget-NLL movement mixed / old-bf16: "
              f"{by['mixed']['forget_nll_moved'] / by['old-bf16']['forget_nll_moved']:.2f}x; weights changed per "
              f"step {by['mixed']['changed']:.1%} vs {by['old-bf16']['changed']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
