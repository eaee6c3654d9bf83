"""Chunked next-token cross-entropy equals the full-logits one, for scoring and for gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from tuner.engine import lossfn
from tuner.engine.evaluation import next_token_logits, token_nll
from tuner.engine.methods.base import nll_term, target_ce_term


def test_chunked_nll_equals_cross_entropy_on_random_logits():
    """The head is the identity, so the 'hidden states' are the logits themselves; 7 rows per chunk leaves
    a ragged last chunk."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 1000, generator=gen) * 4
    targets = torch.randint(0, 1000, (3, 50), generator=gen)
    expected = F.cross_entropy(logits.reshape(-1, 1000), targets.reshape(-1), reduction="none").view(3, 50)
    ours = lossfn.chunked_token_nll(logits, torch.nn.Identity(), targets, rows=7)
    assert ours.dtype == torch.float32 and ours.shape == (3, 50)
    assert (ours - expected).abs().max() <= 1e-6
    # the [B, V, T] layout reduces in another order: equal to within float rounding of values near 16
    per_block = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert ((ours - per_block).abs() / per_block).max() <= 1e-6
    mean = lossfn.chunked_mean_ce(logits, torch.nn.Identity(), targets, rows=7)
    assert abs(float(mean) - float(expected.mean())) <= 1e-6 * float(expected.mean())  # summed per chunk


def test_chunked_mean_ce_gradients_match_the_full_logits():
    """With gradients, chunks recompute their logits in the backward pass; the gradients are unchanged."""
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 40, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (2, 40), generator=gen)
    full = F.cross_entropy(head(hidden).reshape(-1, 300), targets.reshape(-1))
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    chunked = lossfn.chunked_mean_ce(hidden, head, targets, rows=9)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    assert abs(chunked.item() - full.item()) <= 1e-6 * full.item()
    for ours, theirs in zip(chunked_grads, full_grads, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-7, rtol=1e-5)


def _llama(**overrides) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, **overrides)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_testbed_model_is_scored_through_its_head_in_chunks(bench, data):
    """The micro testbed (GPT-2) splits into decoder and head, and chunked scoring equals full logits."""
    ids = data.forget[:4]
    assert lossfn.lm_parts(bench.reference, ids) is not None
    with torch.no_grad():
        expected = F.cross_entropy(next_token_logits(bench.reference, ids).transpose(1, 2), ids[:, 1:],
                                   reduction="none")
        ours = lossfn.next_token_nll(bench.reference, ids, budget_bytes=4 * 512 * 100)  # 100-token chunks
    assert torch.allclose(ours, expected, atol=1e-5)


def test_training_terms_equal_the_full_logits_and_their_gradients(bench, data):
    ids = data.forget[:4]
    labels = torch.randint(0, bench.reference.config.vocab_size, (4, ids.shape[1] - 1))
    model = bench.fresh().train()
    for term, expected_fn in (
        (lambda: nll_term(model, ids), lambda lg: F.cross_entropy(lg.reshape(-1, lg.shape[-1]),
                                                                  ids[:, 1:].reshape(-1))),
        (lambda: target_ce_term(model, ids, labels), lambda lg: F.cross_entropy(lg.reshape(-1, lg.shape[-1]),
                                                                                labels.reshape(-1))),
    ):
        torch.manual_seed(5)  # the same dropout masks in both passes
        full = expected_fn(next_token_logits(model, ids))
        full_grads = torch.autograd.grad(full, list(model.parameters()))
        torch.manual_seed(5)
        ours = term()
        grads = torch.autograd.grad(ours, list(model.parameters()))
        assert abs(ours.item() - full.item()) < 1e-5
        for a, b in zip(grads, full_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_per_token_training_ce_equals_the_full_logits_and_their_gradients(bench, data):
    """The per-token term that NPO, SimNPO and WGA weight: chunked (here 100 tokens a chunk, recomputed in the
    backward pass) it gives the full logits' per-token CE and, through any weighting, the same gradients."""
    ids = data.forget[:4]
    model = bench.fresh().eval()  # no dropout: both passes see the same function
    weights = torch.rand(4, ids.shape[1] - 1)
    full = F.cross_entropy(next_token_logits(model, ids).float().transpose(1, 2), ids[:, 1:], reduction="none")
    full_grads = torch.autograd.grad((weights * full).sum(), list(model.parameters()))
    ours = lossfn.next_token_ce_tokens(model, ids, ids[:, 1:], budget_bytes=4 * 512 * 100)
    assert ours.shape == full.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, full, atol=1e-5)
    grads = torch.autograd.grad((weights * ours).sum(), list(model.parameters()))
    for a, b in zip(grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_logit_softcap_falls_back_to_the_full_logits():
    """Gemma-style soft-capping after the head: head(decoder(x)) is not the model's logits, so scoring
    uses the model's own logits."""
    config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=64, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 12))
    assert lossfn.lm_parts(model, ids) is None
    with torch.no_grad():
        expected = F.cross_entropy(next_token_logits(model, ids).transpose(1, 2), ids[:, 1:], reduction="none")
        assert torch.allclose(lossfn.next_token_nll(model, ids, budget_bytes=4 * 97 * 11), expected, atol=1e-6)


def test_a_peft_wrapped_model_is_scored_through_its_lora_layers():
    peft = pytest.importorskip("peft")
    model = _llama()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                         init_lora_weights=False))
    ids = torch.randint(0, 97, (2, 20))
    assert lossfn.lm_parts(wrapped, ids) is not None
    with torch.no_grad():
        expected = F.cross_entropy(next_token_logits(wrapped, ids).transpose(1, 2), ids[:, 1:], reduction="none")
        unadapted = F.cross_entropy(next_token_logits(wrapped.get_base_model(), ids).transpose(1, 2), ids[:, 1:],
                                    reduction="none")
        with wrapped.disable_adapter():
            plain = F.cross_entropy(next_token_logits(wrapped, ids).transpose(1, 2), ids[:, 1:], reduction="none")
    ours = token_nll(wrapped, ids, 1, torch.device("cpu"))
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.allclose(unadapted, expected)  # the base model's forward runs the injected LoRA layers
    assert (plain - expected).abs().max() > 1e-3  # and the adapters change the result


def test_compile_decoder_keeps_the_results_and_the_state_dict_keys():
    model = _llama()
    ids = torch.randint(0, 97, (2, 16))
    keys = list(model.state_dict())
    with torch.no_grad():
        before = lossfn.next_token_nll(model, ids)
    compiled = lossfn.compile_decoder(model, ids, backend="eager")  # traces with dynamo, no code generation
    assert compiled is model.get_decoder()
    with torch.no_grad():
        after = lossfn.next_token_nll(model, ids)
    assert list(model.state_dict()) == keys
    assert torch.allclose(before, after, atol=1e-6)
