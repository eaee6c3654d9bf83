"""Next-token log-likelihood without a `[B, T, V]` logits tensor: the decoder's hidden states go through the
output head a chunk of tokens at a time, and only that chunk's logits are ever cast to fp32.

At a vocabulary of 128k, one fp32 copy of a batch's full logits is larger than the rest of the forward pass
(8 x 2048 tokens: 7.8 GiB), so chunking is what lets evaluation take larger batches and training fit in less
memory. In fp32 the result equals `F.cross_entropy` on the full logits up to float rounding.

Any Hugging Face causal LM works: `lm_parts` finds its decoder (`get_decoder()`) and output head
(`get_output_embeddings()`), also through a peft wrapper, and checks once per model that head(decoder(x))
reproduces the model's own logits. Where it does not (a logit soft-cap or scale after the head, a prompt-tuning
wrapper, an unknown structure), callers fall back to the model's full logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuner.core.settings import CHUNK_BYTES

CHECK_TOKENS = 16  # tokens of the one-off check that head(decoder(x)) is the model's logits
# config fields of HF models that transform the logits after the output head (Gemma 2/3, Cohere, Granite)
POST_HEAD_FIELDS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


@dataclass
class LMParts:
    """A causal LM split where the logits are made: `decoder(ids) -> hidden`, `head(hidden) -> logits`."""

    decoder: torch.nn.Module
    head: torch.nn.Module

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states `[B, T, H]` (after the last norm), as the head sees them."""
        out = self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


_PARTS: weakref.WeakKeyDictionary[torch.nn.Module, LMParts | None] = weakref.WeakKeyDictionary()


def chunk_rows(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab))


def _candidate_parts(model: torch.nn.Module) -> LMParts | None:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is model or not isinstance(head, torch.nn.Module):
        return None
    config = getattr(model, "config", None)
    for name, neutral in POST_HEAD_FIELDS.items():
        if getattr(config, name, neutral) not in (neutral, None):
            return None
    return LMParts(decoder, head)


@torch.no_grad()
def _reproduces_logits(model: torch.nn.Module, parts: LMParts, ids: torch.Tensor) -> bool:
    """head(decoder(ids)) equals the model's own logits on a few tokens (in eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    try:
        sample = ids[:1, :CHECK_TOKENS]
        full = model(input_ids=sample, attention_mask=torch.ones_like(sample)).logits.float()
        ours = parts.head(parts.hidden(sample)).float()
    except torch.OutOfMemoryError:
        raise
    except (TypeError, ValueError, AttributeError, RuntimeError):  # a decoder that takes other arguments
        return False
    finally:
        model.train(was_training)
    scale = 1.0 + float(full.abs().max())
    return ours.shape == full.shape and bool((ours - full).abs().max() <= 1e-3 * scale)


def _fsdp_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 gathers a sharded model's root weights (embeddings, head) in the root's own forward only; its
    decoder called directly would meet shards. Such a model is scored through its full logits."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def lm_parts(model: torch.nn.Module, ids: torch.Tensor) -> LMParts | None:
    """The decoder and head of `model`, or None when they do not reproduce its logits (checked once) or the
    model is sharded by FSDP2 (which can happen after the check: it shards in place)."""
    if _fsdp_sharded(model):
        return None
    if model not in _PARTS:
        parts = _candidate_parts(model)
        _PARTS[model] = parts if parts is not None and _reproduces_logits(model, parts, ids) else None
    return _PARTS[model]


def next_token_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's full logits for positions 0..T-2, which predict tokens 1..T-1 (the labels of a block).

    Blocks are never padded (EOS inside a block separates documents), which the all-ones mask states."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1, :]


def chunked_token_nll(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                      rows: int) -> torch.Tensor:
    """Per-token NLL `[..., T]` (fp32) of `targets` under logits head(hidden), `rows` tokens at a time.

    For scoring under no_grad: with gradients on, autograd would keep every chunk's logits."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32, device=flat_t.device)
    for start in range(0, flat_t.shape[0], rows):
        logits = head(flat_h[start:start + rows]).float()
        out[start:start + rows] = F.cross_entropy(logits, flat_t[start:start + rows], reduction="none")
    return out.view(targets.shape)


def _chunk_ce_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_mean_ce(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                    rows: int) -> torch.Tensor:
    """Mean cross-entropy of `targets` under head(hidden), differentiable, `rows` tokens at a time.

    With more than one chunk and gradients on, each chunk's logits are recomputed in the backward pass
    (activation checkpointing), so autograd keeps only the hidden states: one extra head matmul forward
    in exchange for no `[N, V]` logits held between forward and backward."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    n = flat_t.shape[0]
    if n <= rows:
        return _chunk_ce_sum(head, flat_h, flat_t) / n
    recompute = torch.is_grad_enabled() and flat_h.requires_grad
    total = flat_h.new_zeros((), dtype=torch.float32)
    for start in range(0, n, rows):
        h, t = flat_h[start:start + rows], flat_t[start:start + rows]
        if recompute:
            total = total + checkpoint(_chunk_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, h, t)
    return total / n


def next_token_ce(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                  budget_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions on `ids` toward hard labels `targets`
    `[B, T-1]`, chunked through the head when the model's structure allows, else on its full logits."""
    parts = lm_parts(model, ids)
    if parts is None:
        logits = next_token_logits(model, ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    hidden = parts.hidden(ids)[:, :-1]
    vocab = parts.head.weight.shape[0] if hasattr(parts.head, "weight") else model.config.vocab_size
    return chunked_mean_ce(hidden, parts.head, targets, chunk_rows(vocab, budget_bytes))


def _chunk_ce_tokens(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def next_token_ce_tokens(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                         budget_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per-token cross-entropy `[B, T-1]` (fp32) toward hard labels `targets`, differentiable: for losses that
    weight or group tokens (per-sequence log-likelihoods, per-token weights) rather than take one mean.

    Chunked like `chunked_mean_ce`: with gradients on and more than one chunk, each chunk's logits are
    recomputed in the backward pass, so only the hidden states and the `[B, T-1]` result are kept."""
    parts = lm_parts(model, ids)
    if parts is None:
        logits = next_token_logits(model, ids)
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    hidden = parts.hidden(ids)[:, :-1]
    vocab = parts.head.weight.shape[0] if hasattr(parts.head, "weight") else model.config.vocab_size
    rows = chunk_rows(vocab, budget_bytes)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    if flat_t.shape[0] <= rows:
        return _chunk_ce_tokens(parts.head, flat_h, flat_t).view(targets.shape)
    recompute = torch.is_grad_enabled() and flat_h.requires_grad
    pieces = []
    for start in range(0, flat_t.shape[0], rows):
        h, t = flat_h[start:start + rows], flat_t[start:start + rows]
        if recompute:
            pieces.append(checkpoint(_chunk_ce_tokens, parts.head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_ce_tokens(parts.head, h, t))
    return torch.cat(pieces).view(targets.shape)


def next_token_nll(model: torch.nn.Module, ids: torch.Tensor, budget_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per-token NLL `[B, T-1]` (fp32, on the device) of each block's tokens 1..T-1, for scoring.

    Only a chunk of fp32 logits exists at a time: through the head when the model's structure allows, else
    sliced from the model's full (autocast-dtype) logits."""
    targets = ids[:, 1:]
    parts = lm_parts(model, ids)
    if parts is None:
        logits = next_token_logits(model, ids)
        rows = max(1, chunk_rows(logits.shape[-1], budget_bytes) // logits.shape[1])
        return torch.cat([F.cross_entropy(logits[s:s + rows].float().transpose(1, 2), targets[s:s + rows],
                                          reduction="none") for s in range(0, ids.shape[0], rows)])
    hidden = parts.hidden(ids)[:, :-1]
    vocab = parts.head.weight.shape[0] if hasattr(parts.head, "weight") else model.config.vocab_size
    return chunked_token_nll(hidden, parts.head, targets, chunk_rows(vocab, budget_bytes))


STATS = ("nll", "hit", "z")  # the last dim of `token_stats`, in order
# fp32 [rows, V] tensors alive at once in `logit_stats` (the logits, their fp32 copy, the log-probs, one product
# reused in place): the chunk's budget is split over them
STATS_COPIES = 4


def logit_stats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`[N, 3]` per token from its logits `[N, V]`: the target's NLL; 1.0 where the argmax is the target (exact
    memorisation); MinK++'s z, the target's log-prob standardised by the mean and standard deviation of the
    log-prob over the whole vocabulary under the model's own distribution (Zhang et al. 2024)."""
    logp = logits.float().log_softmax(-1)
    target_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    hit = (logp.argmax(-1) == targets).float()
    # one vocabulary-sized buffer, reused in place: p log p, then p log^2 p (as exact as separate products)
    weighted = logp.exp().mul_(logp)
    mu = weighted.sum(-1)
    var = weighted.mul_(logp).sum(-1) - mu.square()
    z = (target_lp - mu) / var.clamp(min=1e-6).sqrt()  # a near one-hot distribution has no spread
    return torch.stack([-target_lp, hit, z], dim=-1)


def next_token_stats(model: torch.nn.Module, ids: torch.Tensor, budget_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """`[B, T-1, 3]` (fp32, on the device): `logit_stats` of each block's tokens 1..T-1, chunked like
    `next_token_nll` (the chunk holds `STATS_COPIES` fp32 copies of its logits, so it is that much smaller)."""
    targets = ids[:, 1:]
    budget = budget_bytes // STATS_COPIES
    parts = lm_parts(model, ids)
    if parts is None:
        logits = next_token_logits(model, ids)
        flat, flat_t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    else:
        hidden = parts.hidden(ids)[:, :-1]
        flat, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab = logits.shape[-1] if parts is None else (
        parts.head.weight.shape[0] if hasattr(parts.head, "weight") else model.config.vocab_size)
    rows = chunk_rows(vocab, budget)
    out = torch.empty(flat_t.shape[0], len(STATS), dtype=torch.float32, device=flat_t.device)
    for start in range(0, flat_t.shape[0], rows):
        chunk = flat[start:start + rows]
        out[start:start + rows] = logit_stats(chunk if parts is None else parts.head(chunk), flat_t[start:start + rows])
    return out.view(*targets.shape, len(STATS))


def compile_decoder(model: torch.nn.Module, sample_ids: torch.Tensor, **options) -> torch.nn.Module:
    """`torch.compile` in place (the module object and its state_dict keys stay as they are): the decoder
    when the chunked head path applies, so the head and cross-entropy stay eager and chunked; else the
    whole model. Returns the compiled module."""
    parts = lm_parts(model, sample_ids)  # checked before compiling, so the check runs eagerly
    target = parts.decoder if parts is not None else model
    if getattr(target, "_compiled_call_impl", None) is None:  # nn.Module.compile() sets it; compile once
        target.compile(**options)
    return target
