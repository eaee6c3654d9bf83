"""The memory plan: what one trial needs on each device, estimated from the model config before any weight loads.

A trial that does not fit should be refused in one line that says what would make it fit, not fail with an
out-of-memory error minutes after loading 16 GB of weights. The estimate counts, per device:

- weights: the trainable copy in its `precision` (4 bytes/param for mixed and fp32, 2 for bf16); with LoRA
  the frozen base in the compute dtype plus the adapters;
- original: the pristine weights in the compute dtype, which each trial starts from and which doubles as the
  frozen reference of GA+KL and adversarial labels (with LoRA: the base itself, counted once);
- gradients: one per trainable parameter, in the trainable dtype;
- optimizer: AdamW's two moments (fp32: 8 bytes/param; on bf16 weights 4; 8-bit AdamW 2);
- autocast casts: mixed precision keeps a bf16 copy of each weight it used until the backward pass;
- activations: per token and layer, measured on HF Llama with saved-tensor hooks (tests/test_memory.py
  checks the formula against that measurement), times the batches alive at once (forget and retain);
  logits and their gradient over the vocabulary (one chunk of them where the loss needs only the log-probs
  of given tokens, as `tuner.engine.lossfn` computes them); with gradient checkpointing, one layer input per layer plus
  one layer recomputed;
- cuda runtime: CUDA context, cuBLAS workspaces and allocator slack (a fixed allowance).

Sharding over `workers` (FSDP) divides weights, original, gradients and optimizer state; activations are
per worker.

Planning needs no torch for the testbed (its shape is counted from its declared size), so `study validate` of
a testbed study answers without loading torch; other models are built on the meta device from their config.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tuner.core.precision import planned_precision
from tuner.core.settings import CHUNK_BYTES, LoraSpec
from tuner.core.testbed_sizes import TestbedSize, parse_testbed, testbed_size

if TYPE_CHECKING:
    import torch

GIB = 1024**3
RUNTIME_BYTES = int(1.5 * GIB)
# Activation bytes per token per decoder layer, as (per hidden unit, per MLP unit), by precision. Fitted to
# saved-tensor measurements of HF Llama with sdpa attention (flash/memory-efficient attention keeps no T x T).
ACTIVATION_COEFFS = {"fp32": (36, 16), "mixed": (32, 8), "bf16": (22, 8)}
# Bytes per token per vocabulary entry: saved logits / log-probs plus their gradient in the backward pass.
LOGIT_BYTES = {"fp32": 12, "mixed": 12, "bf16": 6}
STUDY_MAX_WORKERS = 8  # a study's trial may span the GPUs of one node: the widest way out a refusal offers
OPTIMIZER_BYTES = {("adamw", 4): 8, ("adamw", 2): 4, ("adamw8bit", 4): 2, ("adamw8bit", 2): 2}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model: parameter counts and the decoder's dimensions."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    lora_params: dict[str, int] = field(default_factory=dict)  # adapter parameters per LoRA setting (repr)

    @classmethod
    def from_config(cls, config, loras: list[LoraSpec] | None = None, trust_remote_code: bool = False) -> ModelShape:
        """Build the model on the meta device (no memory, no weights) and count exactly."""
        import torch
        import transformers

        from tuner.engine.lora import adapter_parameters

        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = _first(text, "hidden_size", "n_embd", "d_model")
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            hidden=hidden,
            intermediate=_first(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
            layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
            vocab=_first(text, "vocab_size"),
            lora_params={repr(s): adapter_parameters(model, s) for s in (loras or [])},
        )

    @classmethod
    def of_testbed(cls, size: TestbedSize, loras: list[LoraSpec] | None = None) -> ModelShape:
        """The testbed's shape counted from its declared size, as `from_config` counts its built model
        (tests/test_memory.py checks that they agree): GPT-2 with Conv1D layers and learned positions, or
        Llama with as many key/value heads as heads and no biases; both tie the output head to the embeddings,
        and the testbed's tokenizer is trained to exactly `vocab_size` tokens."""
        d, ff, v = size.d_model, size.d_ff, size.vocab_size
        if size.arch == "gpt2":
            adapted = [("c_attn", d, 3 * d), ("c_proj", d, d), ("c_fc", d, ff), ("c_proj", ff, d)]
            per_layer = sum(n_in * n_out + n_out for _, n_in, n_out in adapted) + 4 * d  # two LayerNorms
            params = v * d + size.block_size * d + size.n_layer * per_layer + 2 * d
        else:
            adapted = [(name, d, d) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            adapted += [("gate_proj", d, ff), ("up_proj", d, ff), ("down_proj", ff, d)]
            per_layer = sum(n_in * n_out for _, n_in, n_out in adapted) + 2 * d  # two RMSNorms
            params = v * d + size.n_layer * per_layer + d

        def adapters(spec: LoraSpec) -> int:
            return size.n_layer * sum(spec.r * (n_in + n_out) for name, n_in, n_out in adapted
                                      if spec.target_modules == "all-linear" or name in spec.target_modules)

        return cls(params=params, hidden=d, intermediate=ff, layers=size.n_layer, vocab=v,
                   lora_params={repr(s): adapters(s) for s in (loras or [])})

    @property
    def params_per_layer(self) -> int:
        return max(1, (self.params - self.vocab * self.hidden) // max(1, self.layers))


def _first(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class RunShape:
    """The run settings a plan depends on (from a study's `run:` section or `tuner unlearn` flags)."""

    precision: str  # resolved: mixed, fp32 or bf16
    optimizer: str = "adamw"
    lora: LoraSpec | None = None
    batch_size: int = 8
    block_size: int = 128
    gradient_checkpointing: bool = False
    streams: int = 1  # batches whose graphs are alive at once (forget and retain: 2)
    kl: bool = False  # a KL term holds the reference's full distributions too
    full_logit_streams: int = 0  # of the streams, those whose loss needs full [B, T, V] logits
    chunked_logits: bool = True  # one process: tuner.engine.lossfn's chunks; several ranks go through full logits
    workers: int = 1
    gpu: bool = True  # planned for a GPU: counts the CUDA runtime's own memory

    def describe(self) -> str:
        parts = [f"precision {self.precision}", f"optimizer {self.optimizer}",
                 f"batch_size {self.batch_size} x {self.block_size} tokens"]
        if self.lora is not None:
            parts.append(f"lora r={self.lora.r}")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.workers > 1:
            parts.append(f"{self.workers} workers (FSDP)")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by part; `capacity` is the device's memory when known."""

    run: RunShape
    parts: dict[str, int]
    capacity: int | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def gib(self) -> dict[str, float]:
        """The plan as stored with a trial: GiB per part and in total."""
        out = {name: round(value / GIB, 3) for name, value in self.parts.items()}
        out["total"] = round(self.total / GIB, 3)
        return out

    def summary(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value)
        room = f" of {self.capacity / GIB:.1f} GiB" if self.capacity else ""
        return f"{self.total / GIB:.1f} GiB per device{room} ({parts})"


def plan(shape: ModelShape, run: RunShape, capacity: int | None = None) -> MemoryPlan:
    """The memory one trial needs per device under `run`."""
    weight_bytes = 2 if run.precision == "bf16" else 4
    compute_bytes = 4 if run.precision == "fp32" else 2
    if run.lora is not None:
        trainable = shape.lora_params[repr(run.lora)]
        frozen = shape.params * compute_bytes  # the base, which is also the reference (adapters off)
        weights, original = frozen + trainable * weight_bytes, 0
        casts = 0  # the base is already in the compute dtype
    else:
        trainable = shape.params
        weights, original = shape.params * weight_bytes, shape.params * compute_bytes
        cast_params = shape.params_per_layer if run.gradient_checkpointing else shape.params
        casts = cast_params * 2 if run.precision == "mixed" else 0
    shards = run.workers
    tokens = run.batch_size * run.block_size
    per_hidden, per_mlp = ACTIVATION_COEFFS[run.precision]
    layer = tokens * (per_hidden * shape.hidden + per_mlp * shape.intermediate)
    if run.gradient_checkpointing:
        layer_inputs = tokens * shape.hidden * weight_bytes * shape.layers
        decoder = layer_inputs + layer
    else:
        decoder = layer * shape.layers
    full_logits = tokens * shape.vocab * LOGIT_BYTES[run.precision]
    # log-probabilities of given tokens go through the head a chunk at a time (tuner.engine.lossfn): one chunk's
    # fp32 logits, their gradient and a compute-dtype copy are alive at once
    chunked = min(full_logits, 3 * CHUNK_BYTES) if run.chunked_logits else full_logits
    logits = run.full_logit_streams * full_logits + (run.streams - run.full_logit_streams) * chunked
    kl = tokens * shape.vocab * (compute_bytes + 4) if run.kl else 0
    parts = {
        "weights": -(-weights // shards),
        "original": -(-original // shards),
        "gradients": -(-(trainable * weight_bytes) // shards),
        "optimizer": -(-(trainable * OPTIMIZER_BYTES[(run.optimizer, weight_bytes)]) // shards),
        "autocast casts": casts,
        "activations": run.streams * decoder + logits + kl,
        "cuda runtime": RUNTIME_BYTES if run.gpu else 0,
    }
    return MemoryPlan(run=run, parts=parts, capacity=capacity)


# Changes that lower memory, cheapest for the results first: the first two leave every number as it was.
def _changes(run: RunShape, max_workers: int) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    if not run.gradient_checkpointing:
        out.append(("run.gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if run.batch_size > 1:
        out.append((f"run.batch_size 1 with run.grad_accum x{run.batch_size} (same effective batch)",
                    {"batch_size": 1}))
    if run.optimizer != "adamw8bit":
        out.append(("run.optimizer: adamw8bit", {"optimizer": "adamw8bit"}))
    if run.lora is None:
        out.append(("run.lora: {r: 16}", {"lora": LoraSpec()}))
    if run.precision != "bf16":
        out.append(("run.precision: bf16", {"precision": "bf16"}))
    for workers in (2, 4, 8):
        if run.workers < workers <= max_workers:
            out.append((f"resources: {{workers: {workers}, sharding: fsdp}} (FSDP2 over {workers} GPUs per trial)",
                        {"workers": workers}))
            break
    return out


def ways_out(shape: ModelShape, run: RunShape, capacity: int, max_workers: int = 1,
             limit: int = 4) -> list[tuple[str, MemoryPlan]]:
    """The smallest sets of changes (up to three) under which the plan fits, fewest changes first.

    `shape` must count the adapters of `LoraSpec()` for the LoRA way out (`ModelShape.from_config(loras=...)`)."""
    options = _changes(run, max_workers)
    found: list[tuple[frozenset[int], str, MemoryPlan]] = []
    for size in (1, 2, 3):
        for combo in itertools.combinations(range(len(options)), size):
            if any(kept <= set(combo) for kept, _, _ in found):
                continue  # a subset already fits: this is not a smallest way out
            update: dict = {}
            for i in combo:
                update.update(options[i][1])
            if "lora" in update and repr(update["lora"]) not in shape.lora_params:
                continue
            candidate = plan(shape, replace(run, **update), capacity)
            if candidate.fits:
                found.append((frozenset(combo), " + ".join(options[i][0] for i in combo), candidate))
    return [(text, p) for _, text, p in found[:limit]]


def refusal(shape: ModelShape, run: RunShape, capacity: int, max_workers: int = 1) -> str:
    """The one line that refuses a run which cannot fit, naming the settings that would make it fit."""
    memory = plan(shape, run, capacity)
    text = f"memory plan: {memory.summary()} does not fit"
    options = ways_out(shape, run, capacity, max_workers)
    if options:
        text += "; fits with " + " | ".join(f"{t} ({p.total / GIB:.1f} GiB)" for t, p in options)
    else:
        text += "; no combination of gradient checkpointing, micro-batch 1, 8-bit AdamW, LoRA and bf16 fits"
    return text


EVAL_BATCH_CAP = 64  # blocks: beyond this a forward pass is already long enough to keep a GPU busy


def inference_bytes_per_token(shape: ModelShape, precision: str) -> int:
    """What scoring one token holds without a graph: one decoder layer's working set at a time (the residual
    stream, attention projections and the MLP's gate, up and activation outputs) in the compute dtype."""
    compute_bytes = 4 if precision == "fp32" else 2
    return (8 * shape.hidden + 3 * shape.intermediate) * compute_bytes


def eval_batch(shape: ModelShape, run: RunShape) -> int:
    """Blocks per evaluation batch from the plan: evaluation runs between optimiser steps, when the training
    step's activations are free, so it may fill that memory with blocks scored without a graph (logits go
    through the head a chunk at a time either way). At least the training batch, at most EVAL_BATCH_CAP."""
    budget = plan(shape, run).parts["activations"]
    per_block = run.block_size * inference_bytes_per_token(shape, run.precision)
    return int(max(run.batch_size, min(EVAL_BATCH_CAP, budget // per_block)))


def resolve_eval_batch(settings, config, method_classes: list, precision: str, block_size: int) -> int:
    """`settings.eval_batch_size` when set, else `eval_batch` of this model (its HF `config`) and run."""
    if settings.eval_batch_size is not None:
        return int(settings.eval_batch_size)
    shape = ModelShape.from_config(config, loras=[settings.lora] if settings.lora is not None else None)
    return eval_batch(shape, run_shape(method_classes, settings, precision, block_size, gpu=False))


def measured_peak(device: torch.device) -> int | None:
    """The device's peak allocated bytes since the last reset (CUDA only; None elsewhere)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def device_capacity(device: torch.device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def run_shape(method_classes: list, settings, precision: str, block_size: int, workers: int = 1,
              gpu: bool = True, ranks: int = 1) -> RunShape:
    """The plan's view of a run: `settings` is a study's `run:` section or an UnlearnConfig; with several
    methods the plan covers the most demanding one. `workers` shard the state (FSDP); `ranks` is the world size."""
    return RunShape(
        precision=precision, optimizer=settings.optimizer, lora=settings.lora, batch_size=settings.batch_size,
        block_size=block_size, gradient_checkpointing=settings.gradient_checkpointing,
        streams=max(int(m.uses_forget) + int(m.uses_retain) for m in method_classes),
        kl=any(m.reference_distributions for m in method_classes),
        full_logit_streams=max(m.full_logit_streams for m in method_classes), chunked_logits=ranks == 1,
        workers=workers, gpu=gpu,
    )


def model_shape(model: str, settings, trust_remote_code: bool = False, offline: bool = False) -> ModelShape:
    """The shape of a model by name (local directory, hub id or testbed) from its config alone: no weights
    load. Counts the adapters of the run's LoRA setting and of the default one (a way out). `offline`: a hub
    model's config only from the local HF cache (commands that promise not to contact the hub)."""
    loras = [LoraSpec()] + ([settings.lora] if settings.lora is not None else [])
    if model.startswith("testbed:"):
        return ModelShape.of_testbed(testbed_size(parse_testbed(model)[0]), loras)
    return _shape(model, trust_remote_code, tuple(s.model_dump_json() for s in loras), offline)


@functools.lru_cache(maxsize=8)
def _shape(model: str, trust_remote_code: bool, loras: tuple[str, ...], offline: bool) -> ModelShape:
    import transformers

    from tuner.engine.models import could_not_load, resolve

    source = resolve(model)
    try:
        config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                         local_files_only=offline)
    except (OSError, ValueError) as err:
        raise could_not_load(model, err) from None
    specs = [LoraSpec.model_validate_json(s) for s in loras]
    return ModelShape.from_config(config, specs, trust_remote_code)


@dataclass(frozen=True)
class RunPlan:
    """A run's memory plan with what it was made from. Every plan the code makes (a study's before it runs,
    a trial's on its worker, `tuner unlearn`'s, the one stored with a result) is assembled by `assemble`."""

    shape: ModelShape
    run: RunShape
    plan: MemoryPlan

    @classmethod
    def assemble(cls, shape: ModelShape, method_classes: list, settings, precision: str, block_size: int,
                 capacity: int | None, *, shards: int = 1, ranks: int = 1, gpu: bool = True) -> RunPlan:
        """`settings`: a study's `run:` section or an UnlearnConfig; `precision` the name planned or resolved;
        `shards` the ranks FSDP splits the state over, `ranks` the world size; `capacity` the device's bytes
        (None: no limit known, the plan is only reported)."""
        run = run_shape(method_classes, settings, precision, block_size, workers=shards, gpu=gpu, ranks=ranks)
        return cls(shape, run, plan(shape, run, capacity))

    def refusal(self, max_workers: int = STUDY_MAX_WORKERS) -> str | None:
        """The one-line refusal when the plan does not fit, naming settings that would (up to `max_workers`
        ranks); None when it fits."""
        return None if self.plan.fits else refusal(self.shape, self.run, self.plan.capacity, max_workers)


def gpu_share(gpus: float) -> float:
    """The share of one GPU's memory a trial may use: `gpus: 0.5` puts two trials on each GPU."""
    return min(1.0, gpus) if gpus > 0 else 1.0


def plan_study(spec) -> RunPlan:
    """The memory plan of one trial of `spec` (a StudySpec), for `study validate` and before `study run`.
    A hub model's config is read from the local HF cache only: these commands do not contact the hub.

    It plans for a GPU (`auto` precision is mixed there) when the study asks for GPUs or names their memory;
    trials that share a GPU (`gpus: 0.5`) each get their share of its memory."""
    from tuner.engine import methods

    settings = spec.run
    shape = model_shape(spec.model, settings, spec.trust_remote_code, offline=True)
    testbed = spec.data is None  # the testbed brings its own data and block size
    block_size = testbed_size(parse_testbed(spec.model)[0]).block_size if testbed else spec.data.block_size
    on_gpu = spec.resources.gpus > 0 or spec.resources.gpu_memory_gib is not None
    shards = spec.resources.workers if spec.resources.sharding == "fsdp" else 1
    share = gpu_share(spec.resources.gpus)
    capacity = int(spec.resources.gpu_memory_gib * GIB * share) if spec.resources.gpu_memory_gib else None
    return RunPlan.assemble(shape, [methods.get(m) for m in spec.methods], settings,
                            planned_precision(settings.precision, on_gpu), block_size, capacity, shards=shards,
                            ranks=spec.resources.workers, gpu=on_gpu)


def plan_lines(memory: MemoryPlan) -> list[str]:
    """The plan as the CLI prints it: one line per part, then the total against the device."""
    lines = [f"memory plan per device ({memory.run.describe()}):"]
    lines += [f"  {name:<15} {value / GIB:8.2f} GiB" for name, value in memory.parts.items() if value]
    total = f"  {'total':<15} {memory.total / GIB:8.2f} GiB"
    if memory.capacity:
        total += f" of {memory.capacity / GIB:.2f} GiB: " + ("fits" if memory.fits else "does NOT fit")
    return lines + [total]
