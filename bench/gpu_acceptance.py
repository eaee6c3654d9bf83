"""The GPU acceptance command: every figure the GPU work is judged by, in one run of at most 8 minutes on one
H100 or H200, as one markdown table. Whenever a GPU is available, this is the first thing to run.

A benchmark, not a test. No Ray and no downloads: models are built from configs (the Llama-3.2-1B shape on
`--preset gpu`, a tiny Llama on `--preset cpu`, which keeps the script working on a 2-core machine), the data is
synthetic tokens or standard-library text, and the trial code runs in this process. Each section is a function
with its own time budget (SIGALRM; the total budget caps them too); a section that fails or runs over becomes a
row saying so, and the next section runs. Sections and their goals:

  train            training tokens/s of `run_loop` + `nll_term` and MFU (6 N + 12 L d T FLOPs per token, see
                   bench/trial_cost.py), in the run's precision (mixed: bf16 autocast over fp32 weights, on GPU;
                   fp32 on CPU); goal MFU >= 45 %
  train-compile    the same after `torch.compile` of the decoder (compile time is the warmup, reported apart)
  eval             scoring tokens/s of `token_nll` as a share of the forward-only limit (forward MFU); goal >= 40 %
  trial            the evaluation share of a trial with the default run settings (ga_gd, one epoch of 80 forget
                   blocks, a curve point about every tenth of the run; stop_at_target off so every step runs);
                   goal <= 30 %
  storage          one model saved in bf16 and the same values saved in fp32, each unlearned (ga, 4 steps) from
                   its checkpoint: the forget gaps agree; goal |difference| <= 1e-3
  memory-*         the memory plan against CUDA's measured peak (`peak_vs_plan` of the run's memory record, the
                   CUDA runtime left out) for full fine-tuning in the run's precision, LoRA r=16, and torchao's
                   8-bit AdamW; goal within 10 %
  oom              a trial whose batch cannot fit fails with the batch advice and the same process runs the next
                   trial (bench/oom_recovery.py: on a GPU with the allocator capped, so the plan lets it start)

    python bench/gpu_acceptance.py --preset gpu --write-readme
    python bench/gpu_acceptance.py --preset cpu --write-readme
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gpu_scale
import oom_recovery
import torch
import trial_cost

from tuner.core.precision import PrecisionPlan, resolve_precision
from tuner.core.settings import LoraSpec
from tuner.core.status import FAILED, SCORED
from tuner.engine import methods
from tuner.engine.evaluation import full_metrics, token_nll
from tuner.engine.lossfn import compile_decoder
from tuner.engine.memory import resolve_eval_batch
from tuner.engine.methods.base import nll_term
from tuner.engine.models import ModelSource, Workbench
from tuner.engine.unlearn import UnlearnConfig, run_unlearning

README = Path(__file__).with_name("README.md")
TOTAL_BUDGET_S = {"gpu": 480.0, "cpu": 900.0}
# seconds per section; the GPU ones are sized for the 1B shape on an H100 with room to spare
BUDGET_S = {
    "gpu": {"train": 45, "train-compile": 120, "eval": 30, "trial": 45, "storage": 120, "memory-full": 40,
            "memory-lora": 40, "memory-adamw8bit": 40, "oom": 45},
    "cpu": {"train": 90, "train-compile": 240, "eval": 60, "trial": 120, "storage": 180, "memory-full": 90,
            "memory-lora": 90, "memory-adamw8bit": 30, "oom": 120},
}
GOALS = {"train": 0.45, "eval": 0.40, "trial": 0.30, "storage": 1e-3, "memory": 0.10}
STORAGE_STEPS, STORAGE_LR = 4, 1e-4


@dataclass(frozen=True)
class Row:
    section: str
    setting: str
    result: str
    goal: str
    verdict: str  # met, not met, measured (no goal here), not run: why, failed: why
    seconds: float | None = None


class OverBudget(Exception):
    pass


@dataclass
class Bench:
    """The run's shape (trial_cost's preset as its functions read it), device and precision."""

    args: argparse.Namespace
    device: torch.device
    precision: PrecisionPlan

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.compute

    def batches(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(2)
        a = self.args
        return [torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen).to(self.device) for _ in range(4)]

    def mfu(self, tokens_per_s: float, flops: float) -> float | None:
        return tokens_per_s * flops / (self.args.peak_tflops * 1e12) if self.args.peak_tflops else None


def verdict(value: float | None, goal: float, at_least: bool) -> str:
    if value is None:
        return "measured (no goal without a peak FLOP/s: --peak-tflops)"
    return "met" if (value >= goal if at_least else value <= goal) else "not met"


def pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "not measured"


def peak(value: float | None) -> str:
    return f"peak {value:.1f} GiB" if value is not None else "peak not measured (torch tracks none on CPU)"


# ---- sections -------------------------------------------------------------------------------------------------

def train_section(b: Bench, compiled: bool) -> list[Row]:
    model = trial_cost.build_model(b.args)
    batches = b.batches()
    if compiled:
        compile_decoder(model, batches[0])
    try:
        rate = trial_cost.train_rate(model, batches, nll_term, b.args, b.device, b.dtype)
    finally:
        if compiled:
            torch._dynamo.reset()
    mfu = b.mfu(rate["tokens_per_s"], trial_cost.flops_per_token(model, b.args, True))
    what = f"{b.precision.name}{', torch.compile of the decoder' if compiled else ''}, batch {b.args.batch} x {b.args.seq}"
    result = (f"{rate['tokens_per_s']:,.0f} tok/s, MFU {pct(mfu)}, {peak(rate['peak_gib'])}"
              + (f", compile + warmup {rate['warmup_s']:.0f} s" if compiled else ""))
    return [Row("train-compile" if compiled else "train", what, result, f"MFU >= {GOALS['train']:.0%}",
                verdict(mfu, GOALS["train"], at_least=True))]


def eval_section(b: Bench) -> list[Row]:
    model = trial_cost.build_model(b.args)
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, b.args.vocab, (2 * b.args.eval_batch_new, b.args.seq), generator=gen)
    rate = trial_cost.eval_rate(model, blocks, b.args.eval_batch_new, token_nll, b.device, b.dtype)
    share = b.mfu(rate["tokens_per_s"], trial_cost.flops_per_token(model, b.args, False))
    return [Row("eval", f"token_nll, eval batch {b.args.eval_batch_new} x {b.args.seq}",
                f"{rate['tokens_per_s']:,.0f} tok/s, share of the forward-only limit {pct(share)}, "
                f"{peak(rate['peak_gib'])}", f">= {GOALS['eval']:.0%}",
                verdict(share, GOALS["eval"], at_least=True))]


def trial_section(b: Bench) -> list[Row]:
    model = trial_cost.build_model(b.args)
    data = trial_cost.synthetic_data(b.args)
    cfg = UnlearnConfig(method="ga_gd", lr=1e-5, stop_at_target=False, device=str(b.device))
    batch = resolve_eval_batch(cfg, model.config, [methods.get(cfg.method)], b.precision.name, data.block_size)
    baseline = full_metrics(model, data, batch, b.device, b.dtype)  # once per study, as a study does
    t = trial_cost.trial(model, data, baseline, cfg)
    share = t["eval_s"] / (t["train_s"] + t["eval_s"])
    return [Row("trial", f"ga_gd, run defaults, {t['steps']} steps, {b.args.forget} forget blocks, eval sets of "
                f"{b.args.eval_blocks}", f"training {t['train_s']:.1f} s, evaluation {t['eval_s']:.1f} s: "
                f"evaluation {share:.1%} of the trial", f"<= {GOALS['trial']:.0%}",
                verdict(share, GOALS["trial"], at_least=False))]


def checkpoint_size(b: Bench) -> dict:
    """gpu_scale's size record for this preset's model shape (Llama-3.2-1B's on the gpu preset)."""
    a = b.args
    return dict(hidden=a.d_model, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, intermediate=a.d_ff,
                vocab=a.vocab, block=a.seq, batch=a.batch, eval_batch=a.eval_batch_new,
                files=gpu_scale.PRESETS[a.preset]["files"], eval_blocks=gpu_scale.PRESETS[a.preset]["eval_blocks"])


def storage_section(b: Bench) -> list[Row]:
    import transformers

    from tuner.engine.data import build_data

    size = checkpoint_size(b)
    tokenizer = Workbench.open("testbed:micro").tokenizer
    runner = argparse.Namespace(device=b.device, size=size, lr=STORAGE_LR, steps=STORAGE_STEPS)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stored = {"bf16": gpu_scale.build_checkpoint(size, tokenizer, root, str(b.device))}
        stored["fp32"] = root / "fp32"
        transformers.AutoModelForCausalLM.from_pretrained(stored["bf16"], dtype=torch.float32).save_pretrained(
            stored["fp32"])
        tokenizer.save_pretrained(stored["fp32"])
        data = build_data(gpu_scale.stdlib_sets(size, root), tokenizer,
                          transformers.AutoConfig.from_pretrained(stored["bf16"]))
        for name, path in stored.items():
            rows[name] = gpu_scale.run_tuner_path(b.precision.name, runner, path, data)
            gc.collect()
    diff = abs(rows["bf16"]["forget_gap"] - rows["fp32"]["forget_gap"])
    return [Row("storage", f"ga, {STORAGE_STEPS} steps at lr {STORAGE_LR:.0e}, {b.precision.name}, from a bf16 and an "
                "fp32 checkpoint of the same values", f"forget gap {rows['bf16']['forget_gap']:+.5f} vs "
                f"{rows['fp32']['forget_gap']:+.5f}: difference {diff:.1e}", f"abs. difference <= {GOALS['storage']:g}",
                "met" if diff <= GOALS["storage"] else "not met")]


def memory_section(b: Bench, setting: str) -> list[Row]:
    section = f"memory-{setting}"
    goal = f"peak within {GOALS['memory']:.0%} of the plan"
    if setting == "adamw8bit":
        if b.device.type != "cuda":
            return [Row(section, "ga_gd, torchao AdamW8bit", "-", goal, "not run: needs CUDA")]
        if importlib.util.find_spec("torchao") is None:
            return [Row(section, "ga_gd, torchao AdamW8bit", "-", goal, "not run: needs torchao")]
    original = trial_cost.build_model(b.args).to(b.dtype)  # a worker keeps the original in the compute dtype
    data = trial_cost.synthetic_data(b.args)
    cfg = UnlearnConfig(method="ga_gd", lr=1e-5, max_steps=2, stop_at_target=False, device=str(b.device),
                        batch_size=b.args.batch, lora=LoraSpec() if setting == "lora" else None,
                        optimizer="adamw8bit" if setting == "adamw8bit" else "adamw")
    batch = resolve_eval_batch(cfg, original.config, [methods.get(cfg.method)], b.precision.name, data.block_size)
    baseline = full_metrics(original, data, batch, b.device, b.dtype)
    bench = Workbench(original, None, ModelSource(name="llama from a config", path=""))
    model, reference = bench.trainee(cfg, b.precision)
    result = run_unlearning(model, data, cfg, reference=reference, baseline=baseline)
    env, mem = result.environment, result.environment["memory"]
    what = (f"ga_gd, {b.precision.name}, {'LoRA r=16' if setting == 'lora' else 'full'}, {env['optimizer']}, "
            f"batch {cfg.batch_size} x {b.args.seq}")
    plan = f"plan {mem['plan_gib']['total']:.2f} GiB"
    if mem["peak_gib"] is None:
        return [Row(section, what, f"{plan}; {peak(None)}", goal, "not measured: needs CUDA")]
    plan += f" ({mem['plan_gib']['cuda runtime']:.2f} of it the CUDA runtime, which the peak leaves out)"
    ratio = mem["peak_vs_plan"]
    return [Row(section, what, f"{plan}, measured peak {mem['peak_gib']:.2f} GiB: peak/plan {ratio:.2f}", goal,
                "met" if abs(ratio - 1) <= GOALS["memory"] else "not met")]


def oom_section(b: Bench) -> list[Row]:
    r = oom_recovery.oom_then_recover(str(b.device), log=lambda text: print("  " + text.replace("\n", "\n  ")))
    failed, ok = r["failed"], r["next"]
    reason = failed.payload.get("reason") or ""
    cap = f", allocator capped at {r['capped_gib']:g} GiB" if r["capped_gib"] else ""
    advised = reason.startswith("out of memory") and "halve run.batch_size" in reason
    said = "out of memory, with the batch advice" if advised else f"'{reason[:80]}'"
    good = failed.status == FAILED and advised and ok.status in SCORED
    return [Row("oom", f"micro testbed, ga_gd at batch {r['oversized']}{cap}, then batch 8 in the same process",
                f"oversized: {failed.status} in {r['failed_s']:.1f} s ({said}); next trial: {ok.status} "
                f"in {r['next_s']:.1f} s", "fails with the batch advice; the next trial runs",
                "met" if good else "not met")]


SECTIONS: dict[str, Callable[[Bench], list[Row]]] = {
    "train": lambda b: train_section(b, compiled=False),
    "train-compile": lambda b: train_section(b, compiled=True),
    "eval": eval_section,
    "trial": trial_section,
    "storage": storage_section,
    "memory-full": lambda b: memory_section(b, "full"),
    "memory-lora": lambda b: memory_section(b, "lora"),
    "memory-adamw8bit": lambda b: memory_section(b, "adamw8bit"),
    "oom": oom_section,
}


# ---- running and reporting ------------------------------------------------------------------------------------

def _over_budget(signum, frame):
    raise OverBudget


def run_section(name: str, b: Bench, budget_s: float) -> list[Row]:
    """The section's rows, each with the section's seconds; a failure or an overrun is a row saying so."""
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _over_budget)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
        rows = SECTIONS[name](b)
    except OverBudget:
        rows = [Row(name, "-", "-", "-", f"failed: over its {budget_s:.0f} s budget")]
    except Exception as err:  # a section's failure is a row of the table, not the end of the run
        text = (str(err).strip().splitlines() or [""])[0][:160]
        rows = [Row(name, "-", "-", "-", f"failed: {type(err).__name__}: {text}")]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        gc.collect()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    return [Row(r.section, r.setting, r.result, r.goal, r.verdict, seconds) for r in rows]


def table(rows: list[Row]) -> str:
    lines = ["| section | what ran | result | goal | verdict | s |", "|---|---|---|---|---|---:|"]
    for r in rows:
        cells = [r.section, r.setting, r.result, r.goal, r.verdict,
                 f"{r.seconds:.0f}" if r.seconds is not None else "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def report(b: Bench, device_text: str, rows: list[Row], total_s: float, command: str) -> str:
    a = b.args
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = "GPU" if b.device.type == "cuda" else "CPU (a tiny Llama; its figures say nothing about GPUs)"
    head = (f"**{kind}**, preset `{a.preset}`: {device_text}; torch {torch.__version__}; {date}; "
            f"`{command}`; {total_s:.0f} s in all.\nModel: Llama d_model {a.d_model}, {a.layers} layers, heads "
            f"{a.heads}/{a.kv_heads}, d_ff {a.d_ff}, vocab {a.vocab}, tied embeddings, built from a config; "
            f"precision {b.precision.name}; MFU against "
            + (f"{a.peak_tflops:g} TFLOP/s." if a.peak_tflops else "no peak (none is known for a CPU)."))
    return f"{head}\n\n{table(rows)}\n"


def write_readme(text: str, preset: str) -> None:
    begin, end = f"<!-- gpu_acceptance:{preset}:begin -->", f"<!-- gpu_acceptance:{preset}:end -->"
    readme = README.read_text()
    if begin not in readme or end not in readme:
        sys.exit(f"error: {README} lacks the markers {begin} ... {end}")
    before, rest = readme.split(begin, 1)
    README.write_text(f"{before}{begin}\n{text}{end}{rest.split(end, 1)[1]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["gpu", "cpu"], default=None,
                   help="gpu: Llama-3.2-1B shape (default on a CUDA device); cpu: a tiny Llama")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    p.add_argument("--budget-s", type=float, help="total seconds (default: gpu 480, cpu 900)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: 989 on CUDA, H100/H200 "
                   "SXM dense bf16; none on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--write-readme", action="store_true", help="replace this preset's table in bench/README.md")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    if args.preset == "gpu" and not cuda:
        p.error("--preset gpu needs a CUDA device (the 1B shape on a CPU would take hours); use --preset cpu")
    args.device = "cuda" if cuda and args.preset == "gpu" else "cpu"
    for key, value in trial_cost.PRESETS[args.preset].items():
        setattr(args, key, value)
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    b = Bench(args, device, resolve_precision("auto", device))
    device_text = trial_cost.device_name(device)  # before a section changes the thread count
    total = args.budget_s or TOTAL_BUDGET_S[args.preset]
    started = time.perf_counter()
    rows: list[Row] = []
    print(f"gpu_acceptance: preset {args.preset} on {device_text}, torch {torch.__version__}, "
          f"{b.precision.name}; at most {total:.0f} s", flush=True)
    for name in args.sections.split(","):
        left = total - (time.perf_counter() - started)
        if left < 5:
            rows.append(Row(name, "-", "-", "-", f"not run: the {total:.0f} s total budget was spent"))
            continue
        print(f"{name} ...", flush=True)
        rows.extend(run_section(name, b, min(BUDGET_S[args.preset][name], left)))
        print(f"  {rows[-1].result} [{rows[-1].verdict}] ({rows[-1].seconds:.0f} s)", flush=True)
    command = "python bench/gpu_acceptance.py " + " ".join(argv)
    text = report(b, device_text, rows, time.perf_counter() - started, command.strip())
    print("\n" + text)
    if args.write_readme:
        write_readme(text, args.preset)
        print(f"wrote the table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
