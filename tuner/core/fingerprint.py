"""A model's fingerprint, torch-free: what makes a tuned configuration transferable (the architecture, not the
path it was loaded from). Read from a Hugging Face config, so the study, the methods and `tuner unlearn` name a
model's family and depth the same way."""

from __future__ import annotations

from typing import Any


def fingerprint(config: Any) -> dict[str, object]:
    """model_type, vocab_size, hidden size and decoder layers of a transformers config (GPT-2's own field names
    too)."""
    get = config.to_dict().get
    return {"model_type": get("model_type"), "vocab_size": get("vocab_size"),
            "hidden_size": get("hidden_size") or get("n_embd"),
            "layers": get("num_hidden_layers") or get("n_layer")}
