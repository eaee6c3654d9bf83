"""The memory plan: refuses what cannot fit with the way out in one line, and its activation estimate
agrees with what autograd actually keeps."""

from __future__ import annotations

import pytest
import torch
import transformers

from tuner.cli import main
from tuner.core.settings import RunSettings
from tuner.core.testbed_sizes import SIZES
from tuner.engine import methods, testbed
from tuner.engine.lora import LoraSpec
from tuner.engine.memory import ACTIVATION_COEFFS, ModelShape, RunShape, plan, refusal, run_shape, ways_out

GPU80 = 79 * 1024**3  # an "80 GB" H100 as torch counts it: 79.2 GiB


def llama3_8b() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=8192, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def shape_8b() -> ModelShape:
    return ModelShape.from_config(llama3_8b(), loras=[LoraSpec()])


def test_8b_counts_its_parameters_from_the_config_alone(shape_8b):
    assert abs(shape_8b.params - 8.03e9) / 8.03e9 < 0.01
    # LoRA r=16 on all linear layers of Llama-3-8B: about 42M adapter parameters
    assert 40e6 < shape_8b.lora_params[repr(LoraSpec())] < 45e6


@pytest.mark.parametrize("size_name", list(SIZES))
def test_a_testbed_is_planned_without_torch_as_its_model_counts(size_name):
    """`study validate` of a testbed study plans from the declared size (no torch): the same shape as the
    testbed's model built on the meta device, adapters included."""
    size = SIZES[size_name]
    loras = [LoraSpec(), LoraSpec(r=4, target_modules=["c_proj", "q_proj", "down_proj"])]
    config = testbed._model_config(size, size.vocab_size, eos_id=0)
    assert ModelShape.of_testbed(size, loras) == ModelShape.from_config(config, loras)


def test_the_built_testbed_has_its_declared_shape(bench):
    manifest = testbed.load_manifest(bench.source.testbed_root)
    size = SIZES[manifest["size_name"]]
    assert bench.original.config.vocab_size == size.vocab_size  # the tokenizer reaches its declared vocabulary
    assert ModelShape.of_testbed(size).params == manifest["parameters"]


def ga_kl_run(**settings) -> RunShape:
    """GA+KL, the most demanding method: forget and retain batches, the reference's full distributions."""
    return run_shape([methods.get("ga_kl")], RunSettings(**settings), "mixed", 2048)


def test_8b_mixed_full_finetuning_is_refused_on_80gb_with_ways_out(shape_8b):
    run = ga_kl_run(batch_size=1, gradient_checkpointing=True)
    assert not plan(shape_8b, run, GPU80).fits
    text = refusal(shape_8b, run, GPU80)
    assert "\n" not in text and "does not fit" in text
    assert "run.lora" in text and "run.optimizer: adamw8bit" in text
    options = ways_out(shape_8b, run, GPU80)
    assert any("lora" in t for t, _ in options) and any("adamw8bit" in t for t, _ in options)
    for _, accepted in options:  # every way out it names is one the plan accepts
        assert plan(shape_8b, accepted.run, GPU80).fits
    assert plan(shape_8b, ga_kl_run(batch_size=1, gradient_checkpointing=True, lora=LoraSpec()), GPU80).fits


def test_more_workers_per_trial_is_a_way_out_when_allowed(shape_8b):
    run = ga_kl_run(batch_size=1, gradient_checkpointing=True)
    options = ways_out(shape_8b, run, GPU80, max_workers=8)
    assert any("sharding: fsdp" in t for t, _ in options)


def saved_activation_bytes(config, tokens: tuple[int, int], precision: str) -> int:
    """Bytes autograd keeps for the backward pass of one forward, the weights themselves excluded."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, config.vocab_size, tokens))
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_what_autograd_keeps(precision):
    """Per decoder layer, on a shape the coefficients were not fitted on."""
    def config(layers: int):
        return transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        attn_implementation="sdpa")

    tokens = (2, 64)
    per_layer = (saved_activation_bytes(config(3), tokens, precision)
                 - saved_activation_bytes(config(1), tokens, precision)) / 2
    per_hidden, per_mlp = ACTIVATION_COEFFS[precision]
    estimate = tokens[0] * tokens[1] * (per_hidden * 128 + per_mlp * 352)
    assert abs(estimate - per_layer) <= 0.2 * per_layer, (estimate, per_layer)


def test_unlearn_dry_run_and_validate_refuse_an_8b_config_in_one_line(bench, tmp_path, capsys):
    model_dir = tmp_path / "llama3-8b"
    llama3_8b().save_pretrained(model_dir)  # a config and a tokenizer, no weights: the plan needs nothing else
    bench.tokenizer.save_pretrained(model_dir)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("some text to forget " * 50)
    code = main(["unlearn", "--model", str(model_dir), "--method", "ga_kl", "--lr", "1e-5", "--dry-run",
                 "--gpu-memory-gib", "79", "--block-size", "2048", "--batch-size", "1", "--gradient-checkpointing"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "does NOT fit" in out
    error_lines = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "run.lora" in (out + err)

    code = main(["unlearn", "--model", str(model_dir), "--method", "ga_kl", "--lr", "1e-5", "--dry-run",
                 "--gpu-memory-gib", "79", "--block-size", "2048", "--batch-size", "1", "--gradient-checkpointing",
                 "--lora-r", "16"])
    out, _ = capsys.readouterr()
    assert code == 0 and "fits" in out and "NOT" not in out

    spec, text = tmp_path / "study.yaml", tmp_path / "text"
    spec.write_text(f"name: big\nmodel: {model_dir}\nmethods: [ga]\n"
                    f"data: {{forget: {{path: {text}}}, unseen: {{path: {text}}}, block_size: 2048}}\n"
                    "run: {batch_size: 1, gradient_checkpointing: true}\nresources: {gpus: 1, gpu_memory_gib: 79}\n")
    code = main(["study", "validate", str(spec)])
    out, err = capsys.readouterr()
    assert code == 2 and "memory plan per device" in out and "run.lora" in (out + err)
