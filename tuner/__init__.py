"""Hyperparameter tuning service for unlearning pre-trained causal language models."""

__version__ = "0.1.0"
