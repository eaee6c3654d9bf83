"""Loading the base model once and handing each run a pristine copy of its weights.

A model is named by a local directory, an HF hub id, or `testbed:<size>` (built offline on first use).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tuner.core.errors import TunerError
from tuner.core.precision import PrecisionPlan
from tuner.core.testbed_sizes import parse_testbed
from tuner.engine import testbed
from tuner.engine.lora import AdaptersOff, LoraSpec, attach


@dataclass
class ModelSource:
    """What a model name resolved to; `testbed_root` is set for the built-in testbed."""

    name: str
    path: str
    testbed_root: Path | None = None

    @property
    def retrain_path(self) -> Path | None:
        """The exact-retrain reference, which only the testbed has."""
        return self.testbed_root / "retrain" if self.testbed_root is not None else None


def resolve(name: str, build_progress=None) -> ModelSource:
    if name.startswith("testbed:"):
        size, seed = parse_testbed(name)
        root = testbed.build(size, seed=seed, progress=build_progress)
        return ModelSource(name=name, path=str(root / "model"), testbed_root=root)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise TunerError(f"model '{name}': directory has no config.json (not a saved HF model)")
        return ModelSource(name=name, path=str(local))
    if name.startswith((".", "/", "~")):
        raise TunerError(f"model '{name}': no such directory")
    return ModelSource(name=name, path=name)


def load(source: ModelSource, trust_remote_code: bool = False, torch_dtype: torch.dtype | None = None):
    """(model, tokenizer) from a resolved source; hub failures become one clear line."""
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise could_not_load(source.name, err) from None
    check_tokenizer(model, tokenizer, source.name)
    return model, tokenizer


def could_not_load(name: str, err: BaseException) -> TunerError:
    """A model (or its config or tokenizer) that transformers cannot load, as one line naming it."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TunerError(f"model '{name}': could not be loaded ({first})")


def check_tokenizer(model, tokenizer, name: str) -> None:
    """A tokenizer with ids beyond the embedding table would index out of range mid-run: refuse early."""
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        raise TunerError(f"model '{name}': tokenizer has {len(tokenizer)} tokens but the model embeds only "
                         f"{embeddings}; they do not belong together")


def check_local_model(name: str, trust_remote_code: bool = False, block_size: int | None = None) -> None:
    """Before a study stores anything: a local model directory's tokenizer must fit its embedding table, and
    the data's blocks its context. Reads config and tokenizer only (no weights); hub ids are left to the trials."""
    from tuner.engine.data import model_context_length

    local = Path(name).expanduser()
    if not local.exists() and not name.startswith((".", "/", "~")):
        return  # a hub id: the trials load (and check) it
    source = resolve(name)
    try:
        config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise could_not_load(name, err) from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise TunerError(f"model '{name}': tokenizer has {len(tokenizer)} tokens but the model embeds only "
                         f"{vocab}; they do not belong together")
    context = model_context_length(text_config)
    if block_size is not None and context is not None and block_size > context:
        raise TunerError(f"data.block_size {block_size} is longer than the model's context of {context} tokens")


class Workbench:
    """The base model, loaded once per process in the compute dtype; each run gets a trainable model with
    pristine weights and its frozen reference from `trainee`.

    The pristine model doubles as the frozen reference that ga_kl and adversarial need, so a process holds two
    copies of the weights, not one per trial. With LoRA it holds one: the adapters are attached to the pristine
    model in place, and the reference is that model with its adapters switched off.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, source: ModelSource) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.original = model.eval().requires_grad_(False)
        self._working: torch.nn.Module | None = None
        self._adapted: tuple[LoraSpec, torch.nn.Module, dict[str, torch.Tensor]] | None = None

    @classmethod
    def open(cls, name: str, trust_remote_code: bool = False, build_progress=None,
             dtype: torch.dtype | None = None) -> Workbench:
        """`dtype`: the compute dtype the original is kept in (None: as stored)."""
        return cls.from_source(resolve(name, build_progress), trust_remote_code, dtype)

    @classmethod
    def from_source(cls, source: ModelSource, trust_remote_code: bool = False,
                    dtype: torch.dtype | None = None) -> Workbench:
        model, tokenizer = load(source, trust_remote_code, dtype)
        return cls(model, tokenizer, source)

    @property
    def reference(self) -> torch.nn.Module:
        """The frozen original model (with LoRA attached: the same model with its adapters off)."""
        return AdaptersOff(self._adapted[1]) if self._adapted is not None else self.original

    def fresh(self, weights: torch.dtype = torch.float32) -> torch.nn.Module:
        """A trainable full copy of the pristine weights, in `weights` (the precision's master dtype)."""
        self._detach_adapters()
        if self._working is None or next(self._working.parameters()).dtype != weights:
            self._working = None  # free the old copy before making the new one
            self._working = copy.deepcopy(self.original).to(weights)
        else:
            self._working.load_state_dict(self.original.state_dict())
        return self._working.train().requires_grad_(True)

    def adapted(self, spec: LoraSpec, weights: torch.dtype = torch.float32) -> torch.nn.Module:
        """The original with LoRA adapters in `weights` dtype, reset to the same initial values every run."""
        if self._adapted is None or self._adapted[0] != spec:
            self._detach_adapters()
            self._working = None  # LoRA needs no full trainable copy
            model = attach(self.original, spec, weights)
            initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self._adapted = (spec, model, initial)
        _, model, initial = self._adapted
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in initial:
                    p.copy_(initial[name])
        return model.train()

    def trainee(self, settings, precision: PrecisionPlan) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(trainable model, frozen reference) for one run with `settings.lora` under `precision`."""
        if settings.lora is not None:
            model = self.adapted(settings.lora, precision.weights)
        else:
            model = self.fresh(precision.weights)
        return model, self.reference

    def _detach_adapters(self) -> None:
        if self._adapted is not None:
            self.original = self._adapted[1].unload().eval().requires_grad_(False)
            self._adapted = None
