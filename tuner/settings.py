"""The fixed settings of a run, declared once: a study's `run:` section is this model, `UnlearnConfig` extends
it with the searched hyperparameters, and an exported recommendation carries it whole."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuner.lora import LoraSpec
from tuner.precision import OPTIMIZER_HELP, PRECISION_HELP, Optimizer, Precision, legacy_dtype
from tuner.training import OptimConfig, Schedule


class RunSettings(BaseModel):
    """How every trial of a study runs (see `tuner unlearn --help`); none of these is searched."""

    # NaN and infinity are never a setting (`.nan` in YAML would otherwise pass every range check).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(8, gt=0, description="blocks per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps spent warming up the lr")
    schedule: Schedule = Field("linear", description="lr schedule after the warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    optimizer: Optimizer = Field("adamw", description=OPTIMIZER_HELP)
    lora: LoraSpec | None = Field(None, description="train low-rank adapters instead of all weights (peft)")
    device: str = Field("auto", description="auto (a GPU when there is one), cpu, cuda, cuda:N")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                                            "memory, about a third more compute")
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (default: ~10 per run)")
    stop_at_target: bool = Field(True, description="stop once the forget gap reaches 0 (guideline 1)")
    checkpoint: Literal["best", "last"] = Field(
        "best", description="best: keep the evaluated step closest to the target; last: the final weights")
    eval_batch_size: int = Field(16, gt=0, description="blocks per evaluation batch")
    eval_utility_every: int = Field(
        1, gt=0, description="score retain/general NLL at every k-th curve point (forget and unseen: at every "
                             "point; the final evaluation: everything)")
    eval_utility_blocks: int | None = Field(
        None, gt=0, description="blocks of each retain/general set scored at curve points: a fixed seeded "
                                "subsample (default: all); the final evaluation scores all")
    compile: bool = Field(False, description="torch.compile the model's decoder (pays on GPUs after a compile)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_dtype(cls, data: object) -> object:
        return legacy_dtype(data)

    def optim(self, lr: float) -> OptimConfig:
        return OptimConfig(lr=lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                           schedule=self.schedule, max_grad_norm=self.max_grad_norm, optimizer=self.optimizer)
