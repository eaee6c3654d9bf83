"""Memory savers for the single-GPU user: LoRA (peft) and 8-bit AdamW (torchao) each still unlearn, and are
recorded with the result."""

from __future__ import annotations

import torch

from tuner.core.precision import resolve_precision
from tuner.engine.lora import AdaptersOff
from tuner.engine.unlearn import UnlearnConfig, run_unlearning


def test_lora_unlearns_with_adapters_only_and_keeps_the_reference_pristine(bench, data, baseline):
    cfg = UnlearnConfig(method="ga_kl", lr=3e-3, max_steps=6, device="cpu", stop_at_target=False,
                        checkpoint="last", eval_every=6, lora={"r": 4, "alpha": 8})
    base_before = {n: p.detach().clone() for n, p in bench.original.named_parameters()}
    ids = data.forget[:4]
    with torch.no_grad():
        original_logits = bench.original(input_ids=ids).logits
    model, reference = bench.trainee(cfg, resolve_precision("fp32", torch.device("cpu")))
    assert isinstance(reference, AdaptersOff)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    result = run_unlearning(model, data, cfg, reference=reference, baseline=baseline)

    assert result.metrics["forget_nll"] > baseline["forget_nll"] + 0.05
    assert result.environment["lora"]["r"] == 4
    with torch.no_grad():  # the reference is the untouched base: adapters off gives the original's outputs
        assert torch.allclose(reference(input_ids=ids).logits, original_logits, atol=1e-5)
        assert not torch.allclose(model(input_ids=ids).logits, original_logits, atol=1e-3)
    fresh_model = bench.fresh()  # a full run afterwards starts from the pristine weights, adapters gone
    for name, p in fresh_model.named_parameters():
        assert torch.equal(p, base_before[name]), name


def test_8bit_adamw_unlearns_and_is_recorded(unlearn, baseline):
    # torchao compiles its 8-bit step once per parameter shape, about 7 s each with the C++ compiler on CPU;
    # eager runs the same step's code (what is checked here is that the run uses it and unlearns)
    with torch.compiler.set_stance("force_eager"):
        result = unlearn(method="ga", lr=3e-3, max_steps=4, stop_at_target=False, checkpoint="last", eval_every=4,
                         optimizer="adamw8bit")
    assert result.environment["optimizer"] == "torchao.optim.AdamW8bit"
    assert result.metrics["forget_nll"] > baseline["forget_nll"] + 0.05
