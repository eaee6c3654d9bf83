"""Training-step throughput: the shared loop `tuner.engine.training.run_loop` against a plain PyTorch loop.

A benchmark, not a test. Both loops train the same model (one model, reset to the same initial weights
before every run) on the same pre-generated random token batches (already on the device), with the same
dtype (fp32 on CPU; bf16 autocast on CUDA, as `tuner.engine.evaluation.autocast_for` does), the same AdamW
(fused on CUDA), constant lr, gradient clipping at 1.0 and one host sync per optimiser step.

  shared   run_loop(model, micro_loss, ...) with micro_loss = LossOut(nll_term(model, batch))
  plain    a nanoGPT-style loop: autocast forward, cross-entropy on next tokens, backward,
           clip_grad_norm_(1.0), step, zero_grad(set_to_none=True), loss.item() once per step

Warmup steps are run but not timed (CUDA is synchronised at the start and the end of the timed window);
the two loops alternate over `--repeats` runs and the median is reported. Tokens/s counts every token
fed to the model (batch x seq x grad_accum per step). The ratio shared/plain should be >= 0.95.

    python bench/step_throughput.py                  # CPU preset: GPT-2 style, ~4M params, 8 x 128 tokens
    python bench/step_throughput.py --preset gpu     # Llama style, ~190M params, 32 x 512 tokens, bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from tuner.engine.evaluation import autocast_for
from tuner.engine.methods.base import nll_term
from tuner.engine.training import LossOut, OptimConfig, run_loop

PRESETS: dict[str, dict] = {
    # Small enough for a 2-core CPU: ~4M params (token embeddings tied to the output head).
    "cpu": dict(arch="gpt2", d_model=256, layers=4, heads=4, vocab=2048, seq=128, batch=8, steps=20, warmup=3,
                repeats=5),
    # ~190M params (tied embeddings), 16384 tokens per step: GPU-bound on an H100. At batch 16 the step is still
    # bound by the host issuing kernels (HF Llama's eager forward/backward), and runs differ by 5-15%.
    "gpu": dict(arch="llama", d_model=1024, layers=12, heads=16, vocab=32000, seq=512, batch=32, steps=30,
                warmup=5, repeats=5),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokens/s of the shared training loop (tuner.engine.training.run_loop) against a plain "
                    "nanoGPT-style PyTorch loop on the same model and batches; prints a table and the ratio "
                    "shared/plain (goal >= 0.95). Options left unset come from the preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="size preset; auto = 'gpu' on a CUDA device, else 'cpu'. "
                        + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available, else cpu")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = fp32 on CPU, bf16 autocast on CUDA (what the project's runs use)")
    p.add_argument("--arch", choices=["gpt2", "llama"], help="model family, built from a config (no download)")
    p.add_argument("--d-model", type=int, help="hidden size")
    p.add_argument("--layers", type=int, help="transformer blocks")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--vocab", type=int, help="vocabulary size")
    p.add_argument("--seq", type=int, help="tokens per sequence")
    p.add_argument("--batch", type=int, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--steps", type=int, help="timed optimiser steps per run")
    p.add_argument("--warmup", type=int, help="untimed optimiser steps at the start of every run")
    p.add_argument("--repeats", type=int, help="runs of each loop (alternating); the median is reported")
    p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (no warmup, no decay)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's init and the token batches")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--diagnose", action="store_true",
                   help="also time the plain loop with the project's nll_term as its loss, to tell the "
                        "loss function's cost from the loop's")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)

    device = _resolve_device(args.device)
    preset = PRESETS[args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset_used = args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    args.device_obj = device
    if args.dtype == "auto":
        args.dtype_obj = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        args.dtype_obj = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    if min(args.steps, args.repeats, args.batch, args.grad_accum) < 1 or args.seq < 2 or args.warmup < 0:
        p.error("--steps, --repeats, --batch and --grad-accum must be >= 1, --seq >= 2, --warmup >= 0")
    return args


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A causal LM from a config, in fp32 weights (autocast does the bf16), the way tuner.engine.testbed builds one.

    Dropout is off (nanoGPT's fine-tuning default), so both loops do bit-for-bit the same work on CPU."""
    import transformers

    if args.arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model,
                                         n_layer=args.layers, n_head=args.heads, n_inner=4 * args.d_model,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        d_ff = 256 * math.ceil(8 * args.d_model / 3 / 256)
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=d_ff,
                                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                          num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                          tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(args.device_obj)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """Wall clock of the steps after the warmup: starts after step `warmup`, ends after the last."""

    def __init__(self, device: torch.device, warmup: int, total: int) -> None:
        self.device, self.warmup, self.total = device, warmup, total
        self.start = self.end = None
        if warmup == 0:
            self.mark(0)

    def mark(self, step: int) -> None:
        """Call after optimiser step `step` (1-based) has been issued."""
        if step == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()
        if step == self.total:
            _sync(self.device)
            self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def shared_run(model, batches, args) -> tuple[float, list[float]]:
    total = args.warmup + args.steps
    window = Window(args.device_obj, args.warmup, total)
    accum = args.grad_accum

    def micro_loss(step: int, micro: int) -> LossOut:
        return LossOut(nll_term(model, batches[(step * accum + micro) % len(batches)]))

    def after_step(step: int, logs: dict[str, float]) -> bool:
        window.mark(step)
        return False

    cfg = OptimConfig(lr=args.lr, warmup_ratio=0.0, schedule="constant")
    outcome = run_loop(model, micro_loss, total, accum, cfg, args.device_obj, args.dtype_obj, after_step)
    if outcome.steps_done != total:
        raise RuntimeError(f"shared loop stopped after {outcome.steps_done}/{total} steps: {outcome.reason}")
    return window.seconds, [h["loss"] for h in outcome.history]


def plain_run(model, batches, args, loss_fn: str = "inline") -> tuple[float, list[float]]:
    """nanoGPT's loop, written out: nothing but what a training step needs."""
    device, dtype, accum = args.device_obj, args.dtype_obj, args.grad_accum
    total = args.warmup + args.steps
    window = Window(device, args.warmup, total)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  betas=(0.9, 0.999), weight_decay=0.0, fused=device.type == "cuda")
    model.train()
    losses = []
    for step in range(total):
        for micro in range(accum):
            x = batches[(step * accum + micro) % len(batches)]
            with autocast_for(device, dtype):  # torch.autocast(bf16) on CUDA, nothing in fp32
                if loss_fn == "inline":
                    logits = model(input_ids=x).logits
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
                else:
                    loss = nll_term(model, x)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        window.mark(step + 1)
    return window.seconds, losses


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device_obj, args.dtype_obj
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters with --dtype fp32
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_batches = (args.warmup + args.steps) * args.grad_accum
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
               for _ in range(n_batches)]
    tokens_per_step = args.batch * args.seq * args.grad_accum

    loops = {"plain": lambda: plain_run(model, batches, args), "shared": lambda: shared_run(model, batches, args)}
    if args.diagnose:
        loops["plain+nll_term"] = lambda: plain_run(model, batches, args, loss_fn="nll_term")
    names = list(loops)
    times: dict[str, list[float]] = {n: [] for n in names}
    first_losses: dict[str, list[float]] = {}

    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16 autocast (fp32 weights)"}[dtype]
    print(f"device: {device_name(device)} | torch {torch.__version__} | dtype {dtype_name}", flush=True)
    print(f"model: {args.arch} d_model={args.d_model} layers={args.layers} heads={args.heads} "
          f"vocab={args.vocab} | {n_params / 1e6:.1f}M params | batch {args.batch} x {args.seq} tokens"
          f"{f' x {args.grad_accum} accum' if args.grad_accum > 1 else ''} | preset {args.preset_used}", flush=True)
    print(f"{args.repeats} repeats x ({args.warmup} warmup + {args.steps} timed steps) per loop, alternating",
          flush=True)

    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            model.load_state_dict(initial)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(args.seed + 2)
            gc.collect()
            _sync(device)
            seconds, losses = loops[name]()
            times[name].append(seconds)
            first_losses.setdefault(name, losses)
        print(f"  repeat {r + 1}/{args.repeats}: "
              + "  ".join(f"{n} {tokens_per_step * args.steps / times[n][-1]:,.0f} tok/s" for n in names),
              flush=True)

    median = {n: statistics.median(times[n]) for n in names}
    rows = []
    print()
    print(f"{'loop':<16}{'tokens/s':>14}{'s/step':>12}{'spread':>10}")
    for n in names:
        per_step = median[n] / args.steps
        spread = (max(times[n]) - min(times[n])) / median[n]
        rows.append({"loop": n, "tokens_per_s": tokens_per_step / per_step, "s_per_step": per_step,
                     "runs_s": times[n]})
        print(f"{n:<16}{tokens_per_step / per_step:>14,.0f}{per_step:>12.4f}{spread:>9.1%}")
    ratio = median["plain"] / median["shared"]
    print(f"ratio shared/plain: {ratio:.2f} (goal >= 0.95)")
    if args.diagnose:
        print(f"ratio (plain+nll_term)/plain: {median['plain'] / median['plain+nll_term']:.2f}")
    noisy = [n for n in names if (max(times[n]) - min(times[n])) / median[n] > 0.25]
    if noisy:
        print(f"warning: runs of {', '.join(noisy)} differ by more than 25% (spread): the machine was busy or "
              "the step is host-bound; rerun, or raise --steps/--repeats, before trusting the ratio")
    if args.grad_accum == 1:
        diff = max(abs(a - b) for a, b in zip(first_losses["shared"], first_losses["plain"], strict=True))
        print(f"same work check: max |loss shared - loss plain| over the first run's steps = {diff:.2e}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    if args.json:
        result = {"device": device_name(device), "torch": torch.__version__, "dtype": dtype_name,
                  "params": n_params, "tokens_per_step": tokens_per_step, "ratio_shared_over_plain": ratio,
                  "config": {k: v for k, v in vars(args).items() if not k.endswith("_obj")}, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
