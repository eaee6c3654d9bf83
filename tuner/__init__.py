"""Hyperparameter tuning service for unlearning pre-trained causal language models."""

import logging

__version__ = "0.1.0"

# transformers imports torchao when it is installed (it is: 8-bit and stochastic-rounding AdamW); torchao then
# reports each GPU kernel library it cannot load and torch each enum it registers, on every command. Neither
# is actionable for a user, so only their errors are shown.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
