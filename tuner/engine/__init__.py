"""The engine: one unlearning run on one model (data, models, LoRA, precision plans, the methods and their
losses, the training loop, evaluation, distributed workers, the memory plan, robustness attacks). Its
modules import the core and each other at module level; torch is imported where it computes, so the method
catalogue (`tuner.engine.methods`) loads without it."""
