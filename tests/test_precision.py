"""Precision: a bf16-stored checkpoint trains with fp32 master weights (mixed), or in bf16 with an optimiser
that keeps small updates; the storage dtype of the checkpoint never decides the result."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tuner.cli import main
from tuner.engine.models import Workbench
from tuner.engine.unlearn import UnlearnConfig, run_unlearning


@pytest.fixture(scope="module")
def llama_dirs(bench, tmp_path_factory):
    """A tiny Llama built from a config (the testbed's tokenizer), saved once in bf16 and once in fp32 with
    the very same values (the fp32 copy is the bf16 one upcast), as hub checkpoints are."""
    config = transformers.LlamaConfig(vocab_size=len(bench.tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("llama")
    dirs = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        dirs[name] = root / name
        model.to(dtype).save_pretrained(dirs[name])
        bench.tokenizer.save_pretrained(dirs[name])
    return dirs


def one_step(path, data, precision: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Weights before and after one ga step at the paper's lr, and the optimiser that ran."""
    from tuner.core.precision import resolve_precision

    cfg = UnlearnConfig(method="ga", lr=2e-5, max_steps=1, precision=precision, device="cpu",
                        stop_at_target=False, checkpoint="last", warmup_ratio=0.0)
    plan = resolve_precision(precision, torch.device("cpu"))
    wb = Workbench.open(str(path), dtype=plan.compute)
    model, reference = wb.trainee(cfg, plan)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    result = run_unlearning(model, data, cfg, reference=reference)
    after = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return before, after, result.environment["optimizer"]


def changed_share(before, after) -> float:
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def mean_step(before, after) -> float:
    return float(torch.cat([(after[n] - before[n]).abs().flatten() for n in before]).mean())


@pytest.fixture(scope="module")
def mixed_step(llama_dirs, data):
    """One `mixed` step from the bf16 checkpoint, shared by the tests that compare against it."""
    return one_step(llama_dirs["bf16"], data, "mixed")


def test_mixed_keeps_every_update_of_a_bf16_checkpoint(mixed_step):
    before, after, optimizer = mixed_step
    assert next(iter(before.values())).dtype == torch.float32
    assert changed_share(before, after) >= 0.99
    assert optimizer == "torch.optim.AdamW"


def test_plain_adamw_on_bf16_weights_loses_most_updates(llama_dirs, data):
    """The path `precision` replaces: torch's AdamW directly on the bf16 weights, as a bf16 checkpoint loads."""
    from tuner.engine.methods.base import nll_term
    from tuner.engine.training import LossOut, OptimConfig, run_loop

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dirs["bf16"])
    assert model.dtype == torch.bfloat16
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    plain = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    run_loop(model, lambda s, m: LossOut(-nll_term(model, data.forget[:8])), 1, 1,
             OptimConfig(lr=2e-5, warmup_ratio=0.0), torch.device("cpu"), torch.bfloat16, optimizer=plain)
    after = {n: p.detach().float() for n, p in model.named_parameters()}
    assert changed_share(before, after) < 0.5


def test_bf16_with_stochastic_rounding_moves_weights_as_far_as_mixed(llama_dirs, data, mixed_step):
    mixed_before, mixed_after, _ = mixed_step
    bf16_before, bf16_after, optimizer = one_step(llama_dirs["bf16"], data, "bf16")
    assert next(iter(bf16_after.values())).dtype == torch.float32  # compared in fp32; trained in bf16
    assert optimizer == "torchao.optim._AdamW"
    mixed, bf16 = mean_step(mixed_before, mixed_after), mean_step(bf16_before, bf16_after)
    assert abs(bf16 - mixed) <= 0.1 * mixed, (bf16, mixed)


def test_unlearn_gives_the_same_gap_from_bf16_and_fp32_storage(llama_dirs, bench, tmp_path):
    data_root = bench.source.testbed_root / "data"
    gaps, envs = {}, {}
    for name, path in llama_dirs.items():
        out = tmp_path / name
        code = main(["unlearn", "--model", str(path), "--method", "ga", "--lr", "2e-3", "--max-steps", "4",
                     "--no-stop-at-target", "--eval-every", "4", "--forget", str(data_root / "forget"), "--unseen",
                     str(data_root / "unseen"), "--retain", str(data_root / "retain"), "--block-size", "64",
                     "--device", "cpu", "--out", str(out)])
        assert code == 0
        report = json.loads((out / "metrics.json").read_text())
        gaps[name], envs[name] = report["metrics"]["forget_gap"], report["environment"]
    assert abs(gaps["bf16"] - gaps["fp32"]) <= 1e-3
    assert envs["bf16"]["precision"] == "fp32" and envs["bf16"]["weights_dtype"] == "float32"
    assert envs["bf16"]["memory"]["plan_gib"]["total"] > 0
