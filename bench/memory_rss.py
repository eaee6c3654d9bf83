"""The memory plan against the measured peak on CPU: `tuner unlearn` runs for real, and the peak resident set
size of its process is compared with the plan's total that the run stored (metrics.json,
`environment.memory.plan_gib.total`).

A benchmark, not a test. Two models:
  testbed   the small testbed (`testbed:small`), as the README's quick start uses it;
  134m      a Llama of 134M parameters built from a config and saved in bf16 like a hub checkpoint (the small
            testbed's tokenizer, so no download), on the user's own data: text files of the standard library.

The peak is the process's own `ru_maxrss` at exit (a wrapper runs the CLI in-process and prints it), so it
counts everything the process held at its worst moment: the plan's parts plus what the plan leaves out on
purpose for a device (the interpreter and its libraries, the tokenizer, the token blocks). The wrapper also
samples the resident memory every 10 ms and prints it per phase of the run (load, tokenise, the trainee copy,
scoring the original, training, scoring the kept checkpoint, saving), so a gap can be placed.

    python bench/memory_rss.py                      # both models, a few optimiser steps each
    python bench/memory_rss.py --models testbed
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# Runs the CLI in-process and reports its peak RSS, and the resident memory per phase of the run: a thread
# samples /proc/self/statm every 10 ms, and the phases are marked by wrapping the functions that begin them
# (the same functions the CLI calls; nothing of the run changes).
WRAPPER = """
import os, resource, sys, threading, time
PAGE = os.sysconf("SC_PAGE_SIZE")
phases, current = {}, ["imports"]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def sample():
    while True:
        value = rss()
        start, peak = phases.setdefault(current[0], [value, value])
        phases[current[0]][1] = max(peak, value)
        time.sleep(0.01)

def mark(name):
    value = rss()
    phases.setdefault(name, [value, value])
    current[0] = name

def wrap(module, attr, name):
    inner = getattr(module, attr)
    def wrapped(*a, **k):
        mark(name)
        return inner(*a, **k)
    setattr(module, attr, wrapped)

threading.Thread(target=sample, daemon=True).start()
import tuner.engine.data as D, tuner.engine.models as M, tuner.engine.unlearn as U, tuner.engine.training as T
wrap(M.Workbench, "from_source", "load the model")
wrap(D, "build_data", "tokenise the data")
wrap(M.Workbench, "trainee", "the trainee copy")
wrap(U, "original_metrics", "score the original")
wrap(U, "run_loop", "train")
wrap(U, "full_metrics", "score the kept checkpoint")
from tuner.cli import main
try:
    code = main(sys.argv[1:])
finally:
    mark("save and exit")
    for name, (start, peak) in phases.items():
        print(f"PHASE {name}|{start}|{peak}", file=sys.stderr)
    print(f"MAXRSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""
GIB = 1024**3
STEPS = ["--max-steps", "4", "--eval-every", "2", "--no-stop-at-target", "--device", "cpu"]


def build_134m(folder: Path) -> Path:
    """A Llama of ~134M parameters from a config, bf16 on disk, with the small testbed's tokenizer."""
    import torch
    import transformers

    from tuner.engine.models import Workbench

    tokenizer = Workbench.open("testbed:small").tokenizer
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=14, num_attention_heads=12, num_key_value_heads=12,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    path = folder / "llama-134m"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def own_data(folder: Path) -> list[str]:
    """Forget, unseen and retain folders of standard-library files (different files in each)."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if 5_000 < p.stat().st_size < 30_000)
    args = []
    for i, name in enumerate(("forget", "unseen", "retain")):
        target = folder / name
        target.mkdir()
        for path in files[i * 6:(i + 1) * 6]:
            shutil.copy(path, target / path.name)
        args += [f"--{name}", str(target)]
    return args


def run(model: str, extra: list[str], folder: Path) -> dict:
    out = folder / "out"
    cmd = [sys.executable, "-c", WRAPPER, "unlearn", "--model", model, "--method", "ga_gd", "--lr", "1e-4",
           *STEPS, *extra, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    peak_kib = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("MAXRSS_KIB"))
    phases = [line[len("PHASE "):].split("|") for line in done.stderr.splitlines() if line.startswith("PHASE ")]
    report = json.loads((out / "metrics.json").read_text())
    memory = report["environment"]["memory"]
    return {"plan": memory["plan_gib"], "peak_gib": peak_kib * 1024 / GIB, "seconds": time.perf_counter() - started,
            "phases": [(name, int(start) / GIB, int(peak) / GIB) for name, start, peak in phases]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=["testbed", "134m"], default=["testbed", "134m"])
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.models:
            folder = root / name
            folder.mkdir()
            if name == "testbed":
                result = run("testbed:small", [], folder)
            else:
                result = run(str(build_134m(folder)), own_data(folder), folder)
            rows.append((name, result))
            print(f"  {name}: {result['seconds']:.0f} s", flush=True)
    print()
    print(f"{'model':<9}{'plan GiB':>10}{'peak RSS GiB':>14}{'RSS / plan':>12}{'RSS - plan GiB':>16}  plan parts (GiB)")
    for name, r in rows:
        total = r["plan"]["total"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["plan"].items() if k != "total" and v)
        print(f"{name:<9}{total:>10.2f}{r['peak_gib']:>14.2f}{r['peak_gib'] / total:>12.2f}"
              f"{r['peak_gib'] - total:>16.2f}  {parts}")
    for name, r in rows:
        print(f"\nresident memory of the {name} run by phase (GiB; sampled every 10 ms):")
        print(f"  {'phase':<28}{'at start':>10}{'peak':>8}{'rise':>8}")
        for phase, start, peak in r["phases"]:
            print(f"  {phase:<28}{start:>10.2f}{peak:>8.2f}{peak - start:>+8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
