"""Every settings model a study or a run carries, declared once and torch-free, so the CLI and the spec read
them without loading a model: a study's `run:` section is `RunSettings` (with its LoRA and optimiser parts;
`UnlearnConfig` extends it with the searched hyperparameters, and an exported recommendation carries it whole),
its `data:` section `DataSpec`, and its robustness checks `RelearnSettings` and `QuantSettings`. The code
that acts on them lives in the engine, with what it does (`training`, `lora`, `data`, `robustness`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuner.core.precision import OPTIMIZER_HELP, PRECISION_HELP, Optimizer, Precision, legacy_dtype

Schedule = Literal["linear", "cosine", "constant", "wsd"]
SCHEDULE_HELP = ("lr schedule after the warmup: linear or cosine decay to 0 over the whole horizon; constant; wsd "
                 "(warmup-stable-decay: constant, then a linear decay over the last decay_ratio of the horizon). "
                 "With constant and the warmup in steps (warmup_steps, or warmup_ratio 0) the lr at step S does not "
                 "depend on the horizon, so a long trial's checkpoint at step S is what a run ending at S gives; "
                 "wsd keeps that only for the steps before its decay, which starts at a share of the horizon")


# The screening defaults: sized so that evaluation is at most a quarter of a default trial on the small
# testbed, whose evaluation sets are as large as its forget set (bench/trial_cost.py --part defaults).
SCREENING_BLOCKS = 16
MINK_K = 0.4  # the Min-K% share of open-unlearning's MIA configs (the paper's sweep starts at 0.3)
SCREENING_UTILITY_EVERY = 2
# The fp32 logits of one chunk of `tuner.engine.lossfn`'s chunked losses (1046 tokens at vocab 128256); the memory
# plan (`tuner.engine.memory`) counts the same bytes.
CHUNK_BYTES = 512 * 2**20


class OptimConfig(BaseModel):
    """Optimiser settings; the defaults are the paper's (AdamW, 3% warmup, weight decay 0)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Schedule = "linear"
    decay_ratio: float = Field(0.2, gt=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Optimizer = "adamw"


class LoraSpec(BaseModel):
    """`run.lora`: low-rank adapters on the model's linear layers; the base weights stay frozen."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scale numerator: adapters are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (0 keeps runs deterministic)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear (not the lm_head)")


class RunSettings(BaseModel):
    """How every trial of a study runs (see `tuner unlearn --help`); none of these is searched."""

    # NaN and infinity are never a setting (`.nan` in YAML would otherwise pass every range check).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(8, gt=0, description="blocks per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps spent warming up the lr")
    warmup_steps: int | None = Field(
        None, ge=0, description="warm the lr up over this many optimiser steps instead of warmup_ratio's share: "
                                "a fixed count does not depend on the horizon")
    schedule: Schedule = Field("linear", description=SCHEDULE_HELP)
    decay_ratio: float = Field(0.2, gt=0, le=1, description="wsd: share of the horizon the lr decays over, at its end")
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
    prune_hopeless: bool = Field(
        True, description="stop a trial that cannot reach the target band by its horizon at its pace "
                          "(stopped_hopeless; tuner.engine.stopping.hopeless states the rule)")
    stop_on_collapse: bool = Field(
        True, description="stop a trial whose utility drop exceeds the target's utility_tolerance at two "
                          "utility-measuring evaluations in a row (stopped_collapsed)")
    checkpoint: Literal["best", "last"] = Field(
        "best", description="best: keep the evaluated step closest to the target; last: the final weights")
    eval_batch_size: int | None = Field(
        None, gt=0, description="blocks per evaluation batch (default: from the memory plan, as many as the "
                                "training step's activation memory holds without a graph: at least batch_size, "
                                "at most 64)")
    # Screening (tuner.engine.evaluation.Screening): curve points steer the run and propose candidates, so
    # they are cheap estimates with standard errors; the kept checkpoint is always scored on every block.
    eval_gap_blocks: int | None = Field(
        SCREENING_BLOCKS, gt=0, description="blocks of the forget and of the unseen set scored at curve points: "
                                            "a fixed seeded subsample, each figure an estimate with its standard "
                                            "error (null: all blocks); the kept checkpoint is scored on all")
    eval_utility_every: int = Field(
        SCREENING_UTILITY_EVERY, gt=0, description="score retain/general NLL at every k-th curve point (the "
                                                   "forget gap: at every point; the kept checkpoint: "
                                                   "everything)")
    eval_utility_blocks: int | None = Field(
        SCREENING_BLOCKS, gt=0, description="blocks of each retain/general set scored at curve points: a fixed "
                                            "seeded subsample, each figure an estimate with its standard error "
                                            "(null: all blocks); the kept checkpoint is scored on all")
    compile: bool = Field(False, description="torch.compile the model's decoder (pays on GPUs after a compile)")
    verbmem_blocks: int | None = Field(
        None, gt=0, description="forget (and unseen) blocks whose first verbmem_prefix tokens prompt a greedy "
                                "continuation scored by ROUGE-L F1 against the true text (MUSE's verbatim "
                                "memorisation, on every fully scored model); null: off, generation is costly")
    verbmem_prefix: int = Field(32, gt=0, description="prompt tokens of each VerbMem block")
    verbmem_tokens: int = Field(128, gt=0, description="tokens each VerbMem continuation generates (at most what "
                                                       "the block holds after the prompt)")
    mink_k: float = Field(
        MINK_K, gt=0, le=1, description="share of a block's least likely tokens the Min-K% and MinK++ membership "
                                        "scores average (open-unlearning's 0.4); stored with every figure")

    @model_validator(mode="before")
    @classmethod
    def _legacy_dtype(cls, data: object) -> object:
        return legacy_dtype(data)

    def optim(self, lr: float) -> OptimConfig:
        return OptimConfig(lr=lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                           warmup_steps=self.warmup_steps, schedule=self.schedule, decay_ratio=self.decay_ratio,
                           max_grad_norm=self.max_grad_norm, optimizer=self.optimizer)


# ---- data -------------------------------------------------------------------------------------------------------

RetainSource = Literal["in_distribution", "general"]


class TextSource(BaseModel):
    """Where one set's text comes from: a file, a directory of files, JSONL, or an HF `datasets` spec."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str | None = Field(None, description="a text file, a JSONL file, or a directory of files")
    hf: str | None = Field(None, description="an HF datasets name, e.g. llmunlearn/unlearn_dataset")
    config: str | None = Field(None, description="the HF dataset config, e.g. arxiv")
    split: str | None = Field(None, description="the HF dataset split, e.g. forget")
    format: Literal["auto", "text", "jsonl"] = "auto"
    text_field: str = Field("text", description="the field holding the text in JSONL or HF rows")
    pattern: str = Field("*", description="glob for the files of a directory")

    @model_validator(mode="after")
    def _one_origin(self) -> TextSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' or 'hf'")
        if self.hf is not None and self.split is None:
            raise ValueError("an 'hf' source needs a 'split'")
        return self

    def label(self) -> str:
        if self.path is not None:
            return self.path
        return f"hf:{self.hf}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"


class DataSpec(BaseModel):
    """The four sets of an unlearning problem and how they are cut into blocks."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    forget: TextSource
    unseen: TextSource = Field(description="same-distribution text the model never saw (approximate retraining)")
    retain: TextSource | None = Field(None, description="in-distribution retained text")
    general: TextSource | None = Field(None, description="general retained text (another domain)")
    block_size: int = Field(128, gt=1)
    max_forget_blocks: int | None = Field(None, gt=0)
    max_eval_blocks: int = Field(256, gt=0, description="cap per evaluation set (forget, unseen, retain, general)")
    retain_eval_fraction: float = Field(0.2, gt=0, lt=1, description="share of retain blocks held out to measure utility")


# ---- robustness checks ------------------------------------------------------------------------------------------

AttackSource = Literal["forget", "retain"]


class RelearnSettings(BaseModel):
    """The relearning attack, as a setting a study can carry (`relearn(**settings.model_dump(), ...)`).

    Defaults: 10 optimiser steps of AdamW at a constant lr of 1e-5 on batches of 8 blocks, one half of the
    forget blocks as attack text. lr 1e-5 is the usual full fine-tuning rate of 7B-class models (TOFU fine-tunes
    Llama-2-7B at 1e-5); the relearning paper's per-benchmark settings could not be checked here, so treat it as
    a starting point. It is a setting because the right rate scales with the model: the micro testbed,
    pre-trained at 3e-3, needs ~1e-3 to move visibly in 5 steps. Ten steps: the attack is meant to be *small*
    (the paper's point is that little data and few steps suffice), and a short attack keeps the check cheap next
    to a trial (bench/robustness_cost.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(10, gt=0, description="optimiser steps of the attack")
    lr: float = Field(1e-5, gt=0, description="constant AdamW learning rate of the attack")
    batch_size: int = Field(8, gt=0, description="blocks per attack step")
    source: AttackSource = Field("forget", description="forget: the attack half of the forget set; retain: retain text")
    attack_fraction: float = Field(0.5, gt=0, lt=1, description="share of the forget blocks the attacker holds")
    eval_every: int | None = Field(None, gt=0, description="steps between curve points (default: ~5 per attack)")


class QuantSettings(BaseModel):
    """Weight-only round-to-nearest quantization as the unlearning-via-quantization paper applies it: group-wise
    scales over 128 input features (GPTQ's and AWQ's default group size), symmetric (GPTQ's default)."""

    model_config = ConfigDict(extra="forbid")

    bits: tuple[int, ...] = (4, 8)
    group_size: int = Field(128, gt=0)
    symmetric: bool = True
