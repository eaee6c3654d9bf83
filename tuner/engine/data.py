"""Text sources -> fixed-length token blocks for the forget, retain, general and unseen sets.

Every set is tokenised once (per study) into a `[n_blocks, block_size]` LongTensor; trials only index it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuner.core.errors import TunerError
from tuner.core.settings import DataSpec, RetainSource, TextSource

log = logging.getLogger("tuner.engine.data")


def _read_text_file(path: Path, role: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TunerError(f"{role}: {path} is not UTF-8 text (byte {err.start}); convert it or remove it") from None


def _read_jsonl(path: Path, text_field: str, role: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text_file(path, role).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TunerError(f"{role}: {path} line {lineno} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise TunerError(f"{role}: {path} line {lineno} has no text field '{text_field}' (found: {keys})")
        if not isinstance(row[text_field], str):
            raise TunerError(f"{role}: {path} line {lineno} field '{text_field}' is not a string")
        docs.append(row[text_field])
    return docs


def _read_path(path: Path, source: TextSource, role: str) -> list[str]:
    fmt = source.format
    if fmt == "auto":
        fmt = "jsonl" if path.suffix in {".jsonl", ".ndjson"} else "text"
    if fmt == "jsonl":
        return _read_jsonl(path, source.text_field, role)
    return [_read_text_file(path, role)]


def _read_hf(source: TextSource, role: str) -> list[str]:
    try:
        import datasets  # optional: pip install 'unlearn-tuner[hf]'
    except ImportError:
        raise TunerError(f"{role}: source {source.label()} needs the 'datasets' package "
                         "(pip install 'unlearn-tuner[hf]')") from None
    try:
        ds = datasets.load_dataset(source.hf, source.config, split=source.split)
    except Exception as err:  # network, auth, unknown config: all reported the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TunerError(f"{role}: could not load {source.label()}: {first}") from None
    if source.text_field not in ds.column_names:
        raise TunerError(f"{role}: {source.label()} has no text field '{source.text_field}' "
                         f"(columns: {', '.join(ds.column_names)})")
    return [t for t in ds[source.text_field] if isinstance(t, str)]


def read_documents(source: TextSource, role: str, base_dir: Path | None = None) -> list[str]:
    """All non-empty documents of a source, in a deterministic order; errors name the set and the file."""
    if source.hf is not None:
        docs = _read_hf(source, role)
    else:
        path = Path(source.path).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.exists():
            raise TunerError(f"{role}: file not found: {path}")
        if path.is_dir():
            files = sorted(p for p in path.rglob(source.pattern) if p.is_file())
            if not files:
                raise TunerError(f"{role}: directory {path} has no files matching '{source.pattern}'")
            docs = [d for f in files for d in _read_path(f, source, role)]
        else:
            docs = _read_path(path, source, role)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TunerError(f"{role}: {source.label()} contains no text")
    return docs


def tokenize_blocks(docs: list[str], tokenizer, block_size: int, role: str) -> torch.Tensor:
    """Concatenate documents (each closed by EOS) and cut into full blocks; the tail is dropped."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for seq in ids:
        flat.extend(seq)
        if eos is not None:
            flat.append(eos)
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise TunerError(f"{role}: only {len(flat)} tokens, fewer than one block of {block_size}; "
                         "add text or lower data.block_size")
    return torch.tensor(flat[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def subsample(blocks: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """A seeded subset that keeps the original order, so the same seed always picks the same blocks."""
    if limit is None or blocks.shape[0] <= limit:
        return blocks
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(blocks.shape[0], generator=gen)[:limit].sort().values
    return blocks[keep]


def split_holdout(blocks: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) blocks: utility is measured on blocks that descent never trained on."""
    n_eval = max(1, round(blocks.shape[0] * fraction))
    if blocks.shape[0] - n_eval < 1:
        return blocks, blocks
    gen = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(blocks.shape[0], generator=gen)
    return blocks[perm[n_eval:].sort().values], blocks[perm[:n_eval].sort().values]


def zlib_lengths(blocks: torch.Tensor, tokenizer) -> torch.Tensor:
    """zlib-compressed byte length of each block's text: the reference entropy of the zlib MIA score."""
    texts = tokenizer.batch_decode(blocks.tolist())
    return torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float32)


def model_context_length(model_config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class UnlearnData:
    """Token blocks of every set, built once per study and shared read-only by its trials."""

    forget: torch.Tensor
    unseen: torch.Tensor
    forget_eval: torch.Tensor | None = None
    retain_train: dict[str, torch.Tensor] = field(default_factory=dict)
    retain_eval: dict[str, torch.Tensor] = field(default_factory=dict)
    forget_zlib: torch.Tensor | None = None
    unseen_zlib: torch.Tensor | None = None
    block_size: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def retain_for(self, source: RetainSource) -> torch.Tensor:
        if source not in self.retain_train:
            given = ", ".join(self.retain_train) or "none"
            key = "retain" if source == "in_distribution" else "general"
            raise TunerError(f"retain_source '{source}' needs data.{key}, which is not given (given: {given})")
        return self.retain_train[source]

    def eval_sets(self) -> dict[str, torch.Tensor]:
        sets = {"forget": self.forget if self.forget_eval is None else self.forget_eval, "unseen": self.unseen}
        if "in_distribution" in self.retain_eval:
            sets["retain"] = self.retain_eval["in_distribution"]
        if "general" in self.retain_eval:
            sets["general"] = self.retain_eval["general"]
        return sets

    def fingerprints(self) -> dict[str, str]:
        """sha256 of each set's token blocks: provenance that survives renamed or moved files."""
        sets = {"forget": self.forget, "unseen": self.unseen}
        sets.update({f"retain_{k}": torch.cat([self.retain_train[k], self.retain_eval[k]]) for k in self.retain_train})
        return {name: hashlib.sha256(blocks.numpy().tobytes()).hexdigest() for name, blocks in sets.items()}

    def summary(self) -> dict[str, int]:
        out = {"forget": int(self.forget.shape[0]), "unseen": int(self.unseen.shape[0])}
        for name, blocks in self.retain_train.items():
            out[f"retain_{name}_train"] = int(blocks.shape[0])
        for name, blocks in self.retain_eval.items():
            out[f"retain_{name}_eval"] = int(blocks.shape[0])
        return out


def build_data(spec: DataSpec, tokenizer, model_config=None, seed: int = 0,
               base_dir: Path | None = None) -> UnlearnData:
    """Read, tokenise and split every set of `spec`; raises TunerError naming the set at fault."""
    context = model_context_length(model_config) if model_config is not None else None
    if context is not None and spec.block_size > context:
        raise TunerError(f"data.block_size {spec.block_size} is longer than the model's context of {context} tokens")

    def blocks(role: str, source: TextSource) -> torch.Tensor:
        return tokenize_blocks(read_documents(source, role, base_dir), tokenizer, spec.block_size, role)

    forget = subsample(blocks("forget", spec.forget), spec.max_forget_blocks, seed)
    unseen = subsample(blocks("unseen", spec.unseen), spec.max_eval_blocks, seed)
    data = UnlearnData(forget=forget, unseen=unseen, block_size=spec.block_size,
                       forget_eval=subsample(forget, spec.max_eval_blocks, seed))
    data.sources = {"forget": spec.forget.label(), "unseen": spec.unseen.label()}
    for key, name, source in (("retain", "in_distribution", spec.retain), ("general", "general", spec.general)):
        if source is None:
            continue
        train, held = split_holdout(blocks(key, source), spec.retain_eval_fraction, seed)
        data.retain_train[name] = train
        data.retain_eval[name] = subsample(held, spec.max_eval_blocks, seed)
        data.sources[key] = source.label()
    check_overlap(data)
    data.forget_zlib = zlib_lengths(data.forget_eval, tokenizer)
    data.unseen_zlib = zlib_lengths(data.unseen, tokenizer)
    return data


def forget_overlap(data: UnlearnData) -> dict[str, float]:
    """Share of forget blocks that also appear, token for token, in each other set (unseen, retain, general;
    a retain set counts its training and held-out blocks), for the sets where it is above 0."""
    forget = [row.tobytes() for row in data.forget.numpy()]
    others = {"unseen": [data.unseen]}
    for name, key in (("in_distribution", "retain"), ("general", "general")):
        others[key] = [t for t in (data.retain_train.get(name), data.retain_eval.get(name)) if t is not None]
    shares = {}
    for key, parts in others.items():
        if not parts:
            continue
        seen = {row.tobytes() for blocks in parts for row in blocks.numpy()}
        share = sum(block in seen for block in forget) / len(forget)
        if share > 0:
            shares[key] = share
    return shares


def check_overlap(data: UnlearnData) -> None:
    """Forget blocks must not also be what the model keeps (retain, general) or what it never saw (unseen): a
    complete overlap is refused (the sets are the same text, so unlearning and keeping it contradict each
    other), a partial one is reported in one line."""
    shares = forget_overlap(data)
    if not shares:
        return
    named = {k: f"{k} ({data.sources[k]})" if k in data.sources else k for k in shares}
    full = [named[k] for k, share in shares.items() if share >= 1.0]
    if full:
        raise TunerError(f"data: every forget block ({data.sources.get('forget', 'forget')}) also appears in "
                         f"{' and '.join(full)}: give a forget set that differs from it")
    log.warning("data: forget blocks also appear in other sets: %s",
                ", ".join(f"{share:.1%} in {named[k]}" for k, share in shares.items()))
