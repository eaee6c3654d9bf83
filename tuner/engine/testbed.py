"""The offline testbed: a real unlearning problem built locally from text every Python install ships.

Domain ("GitHub"): source files of the running interpreter's standard library, split by seed into forget,
unseen and retain files. General domain: the English documentation topics in `pydoc_data.topics`.
A byte-level BPE tokenizer and a small causal LM are pre-trained on retain + general + forget (the forget
files repeated so that they are memorised); the *exact-retrain reference* is the same recipe without the
forget files, so on the testbed the approximate-retraining target can be checked against the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS

import torch
import transformers

from tuner.core.errors import TunerError
from tuner.core.testbed_sizes import SIZES, TestbedSize, testbed_size
from tuner.engine.data import DataSpec, TextSource, tokenize_blocks
from tuner.engine.evaluation import token_nll
from tuner.engine.methods.base import nll_term
from tuner.engine.training import IndexStream, LossOut, OptimConfig, run_loop

TESTBED_VERSION = 3
EOS = "<|endoftext|>"
Progress = Callable[[str, int, int], None]
transformers.utils.logging.disable_progress_bar()  # our own progress bars report builds and loads


def cache_root() -> Path:
    """Where built testbeds live: $TUNER_CACHE, else the user cache directory."""
    env = os.environ.get("TUNER_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unlearn-tuner"
    return base.expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stdlib_files() -> list[Path]:
    """Top-level stdlib modules of a useful size, in name order (the same list on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if 3_000 <= size <= 30_000:
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def select_split(size: TestbedSize, seed: int) -> dict[str, list[Path]]:
    files = stdlib_files()
    need = size.n_forget + size.n_unseen + size.n_retain
    if len(files) < need:
        raise TunerError(f"testbed: the standard library at {sysconfig.get_paths()['stdlib']} has only "
                         f"{len(files)} usable files; {need} are needed")
    random.Random(seed).shuffle(files)
    a, b = size.n_forget, size.n_forget + size.n_unseen
    return {"forget": files[:a], "unseen": files[a:b], "retain": files[b:need]}


def select_general(size: TestbedSize, seed: int) -> list[str]:
    names = sorted(PYDOC_TOPICS)
    random.Random(seed + 1).shuffle(names)
    return sorted(names[: size.n_general])


def testbed_key(size_name: str, seed: int) -> tuple[str, dict[str, list[Path]], list[str]]:
    size = SIZES[size_name]
    split = select_split(size, seed)
    general = select_general(size, seed)
    payload = {
        "version": TESTBED_VERSION, "size": asdict(size), "seed": seed, "torch": torch.__version__,
        "files": {role: [(p.name, _sha256(p.read_bytes())) for p in paths] for role, paths in split.items()},
        "general": [(n, _sha256(PYDOC_TOPICS[n].encode())) for n in general],
    }
    return _sha256(json.dumps(payload, sort_keys=True).encode())[:16], split, general


def data_spec(root: Path) -> DataSpec:
    """The testbed's four sets as ordinary file sources."""
    manifest = load_manifest(root)
    d = root / "data"
    return DataSpec(
        forget=TextSource(path=str(d / "forget")), unseen=TextSource(path=str(d / "unseen")),
        retain=TextSource(path=str(d / "retain")), general=TextSource(path=str(d / "general")),
        block_size=manifest["size"]["block_size"],
    )


def load_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on the texts; handed to transformers as the public `Tokenizer` its JSON
    describes (the same tokenizer, so the same ids)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token=EOS,
                                                bos_token=EOS, unk_token=EOS, pad_token=EOS)


def _model_config(size: TestbedSize, vocab: int, eos_id: int):
    if size.arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=size.block_size, n_embd=size.d_model,
                                       n_layer=size.n_layer, n_head=size.n_head, n_inner=size.d_ff,
                                       bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # as modern LLMs: no dropout
                                       # GPT-2's default tanh approximation is eight elementwise kernels on CPU,
                                       # 14x slower than the exact GELU's one (a sixth of a micro trial)
                                       activation_function="gelu")
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=size.d_model, intermediate_size=size.d_ff,
                                    num_hidden_layers=size.n_layer, num_attention_heads=size.n_head,
                                    num_key_value_heads=size.n_head, max_position_embeddings=size.block_size,
                                    bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                    tie_word_embeddings=True)


def _pretrain(config, blocks: torch.Tensor, size: TestbedSize, seed: int, label: str,
              progress: Progress | None) -> torch.nn.Module:
    """Pre-train from scratch on `blocks` with the project's own training loop."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    stream = IndexStream(blocks.shape[0], seed)
    cfg = OptimConfig(lr=size.lr, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01)
    device = torch.device("cpu")

    def micro_loss(step: int, micro: int) -> LossOut:
        return LossOut(nll_term(model, blocks[stream.take(size.batch_size)]))

    def after_step(step: int, logs: dict[str, float]) -> bool:
        if progress is not None:
            progress(label, step, size.steps)
        return False

    outcome = run_loop(model, micro_loss, size.steps, 1, cfg, device, after_step=after_step)
    if outcome.diverged_at is not None:
        raise RuntimeError(f"testbed pre-training diverged: {outcome.reason}")
    return model.eval()


def build(size_name: str = "micro", seed: int = 0, force: bool = False,
          progress: Progress | None = None) -> Path:
    """Build (or find in the cache) the testbed of this size and seed; returns its directory."""
    size = testbed_size(size_name)
    key, split, general = testbed_key(size_name, seed)
    final = cache_root() / "testbed" / f"{size_name}-s{seed}-{key}"
    if (final / "manifest.json").exists() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{size_name}-", dir=final.parent))
    try:
        files: dict[str, list[dict]] = {}
        texts: dict[str, list[str]] = {}
        for role, paths in split.items():
            (work / "data" / role).mkdir(parents=True)
            texts[role] = []
            files[role] = []
            for p in paths:
                raw = p.read_bytes()
                (work / "data" / role / p.name).write_bytes(raw)
                texts[role].append(raw.decode("utf-8"))
                files[role].append({"name": p.name, "sha256": _sha256(raw), "bytes": len(raw), "origin": str(p)})
        (work / "data" / "general").mkdir(parents=True)
        texts["general"] = [PYDOC_TOPICS[n] for n in general]
        files["general"] = []
        for n, text in zip(general, texts["general"], strict=True):
            (work / "data" / "general" / f"{n}.txt").write_text(text, encoding="utf-8")
            files["general"].append({"name": f"{n}.txt", "sha256": _sha256(text.encode()), "bytes": len(text.encode()),
                                     "origin": f"pydoc_data.topics[{n!r}]"})

        # The tokenizer never sees forget or unseen text, so it leaks nothing the retrained model lacks.
        tokenizer = _train_tokenizer(texts["retain"] + texts["general"], size.vocab_size)
        blocks = {role: tokenize_blocks(texts[role], tokenizer, size.block_size, f"testbed {role}")
                  for role in texts}
        config = _model_config(size, len(tokenizer), tokenizer.eos_token_id)
        kept = torch.cat([blocks["retain"], blocks["general"]])
        with_forget = torch.cat([kept] + [blocks["forget"]] * size.forget_repeat)
        model = _pretrain(config, with_forget, size, seed, "pre-train", progress)
        retrain = _pretrain(config, kept, size, seed, "exact retrain", progress)
        for name, m in (("model", model), ("retrain", retrain)):
            m.save_pretrained(work / name)
            tokenizer.save_pretrained(work / name)

        def nll(m: torch.nn.Module, role: str) -> float:
            return round(float(token_nll(m, blocks[role], 32, torch.device("cpu")).mean()), 4)

        manifest = {
            "testbed_version": TESTBED_VERSION, "size_name": size_name, "size": asdict(size), "seed": seed,
            "key": key, "python": sysconfig.get_python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "files": files,
            "tokens": {role: int(b.numel()) for role, b in blocks.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "nll": {name: {role: nll(m, role) for role in ("forget", "unseen", "retain", "general")}
                    for name, m in (("model", model), ("retrain", retrain))},
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if (final / "manifest.json").exists() and not force:
            return final  # a concurrent builder (another worker) won the race; its build is identical
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
