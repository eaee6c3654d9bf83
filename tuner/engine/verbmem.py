"""MUSE's verbatim memorisation (VerbMem): prompt the model with the first tokens of a block, let it continue
greedily, and score the continuation against the block's true text by ROUGE-L F1 (Google's `rouge-score`, as
MUSE and open-unlearning use it). Generation is the one metric that costs more than a forward pass, so it runs
only when `run.verbmem_blocks` asks for it, on that many seeded blocks, and only on the models that are scored
in full (the original, the exact retrain, each kept checkpoint). Unseen text scored the same way is its
approximate target: a model that never saw the forget set continues it as well as it continues unseen text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuner.core.errors import TunerError

INSTALL = "pip install 'unlearn-tuner[verbmem]'"


@dataclass(frozen=True)
class VerbMemPlan:
    """What VerbMem scores: `blocks` seeded blocks per set, prompted with their first `prefix` tokens,
    continued for `tokens` tokens (fewer when the block is shorter), decoded to text by `decode`."""

    blocks: int
    prefix: int
    tokens: int
    seed: int
    decode: Callable[[list[int]], str]


def rouge_l_scorer():
    """ROUGE-L F1 with rouge-score's own tokenizer (lower case, letters and digits), no stemming, and that
    tokenizer, which says whether a text has anything to score."""
    try:
        from rouge_score import rouge_scorer, tokenizers
    except ImportError:
        raise TunerError(f"run.verbmem_blocks needs the rouge-score package: {INSTALL}") from None
    words = tokenizers.DefaultTokenizer(use_stemmer=False)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=words), words


def prompts_and_truth(blocks: torch.Tensor, plan: VerbMemPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' prompts `[n, prefix]` and true continuations `[n, <= tokens]`."""
    if plan.prefix >= blocks.shape[1]:
        raise TunerError(f"run.verbmem_prefix {plan.prefix} leaves nothing to continue in blocks of "
                         f"{blocks.shape[1]} tokens")
    return blocks[:, :plan.prefix], blocks[:, plan.prefix:plan.prefix + plan.tokens]


@torch.no_grad()
def verbatim_memorisation(model, blocks: torch.Tensor, plan: VerbMemPlan, batch_size: int,
                          device: torch.device) -> float | None:
    """Mean ROUGE-L F1 of the model's greedy continuations of `blocks` (the caller's seeded subsample of
    `plan.blocks`) against their truth.
    A block whose true continuation holds no word ROUGE can score (whitespace, punctuation) is left out rather
    than scored 0 whatever the model says; None when no block could be scored."""
    scorer, words = rouge_l_scorer()
    prompts, truth = prompts_and_truth(blocks, plan)
    was_training = model.training
    model.eval()
    scores = []
    try:
        for start in range(0, prompts.shape[0], batch_size):
            ids = prompts[start:start + batch_size].to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=truth.shape[1], min_new_tokens=truth.shape[1],
                                 pad_token_id=0)  # blocks are unpadded: the pad id is never read
            for made, true in zip(out[:, ids.shape[1]:].tolist(), truth[start:start + batch_size].tolist(),
                                  strict=True):
                text = plan.decode(true)
                if words.tokenize(text):
                    scores.append(scorer.score(text, plan.decode(made))["rougeL"].fmeasure)
    finally:
        model.train(was_training)
    return float(sum(scores) / len(scores)) if scores else None
