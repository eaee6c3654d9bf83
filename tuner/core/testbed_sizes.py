"""The testbed's sizes and how a model name picks one (`testbed:micro`, `testbed:small@3`), torch-free: the
memory plan of a testbed study and the spec's checks read them without building or loading the testbed
(`tuner.engine.testbed` builds it)."""

from __future__ import annotations

from dataclasses import dataclass

from tuner.core.errors import TunerError


@dataclass(frozen=True)
class TestbedSize:
    arch: str  # "gpt2" or "llama"
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    block_size: int
    n_forget: int
    n_unseen: int
    n_retain: int
    n_general: int
    forget_repeat: int
    steps: int
    batch_size: int
    lr: float


SIZES: dict[str, TestbedSize] = {
    # Seconds to build; for tests.
    "micro": TestbedSize("gpt2", 512, 2, 64, 2, 256, 64, 2, 2, 8, 12, 6, 60, 16, 3e-3),
    # A few minutes on 2 CPU cores; a clear memorisation gap (see the manifest's nll figures).
    "small": TestbedSize("llama", 2048, 4, 192, 4, 512, 128, 4, 4, 40, 79, 6, 300, 16, 2e-3),
}


def testbed_size(size_name: str) -> TestbedSize:
    if size_name not in SIZES:
        raise TunerError(f"unknown testbed size '{size_name}' (choose from: {', '.join(SIZES)})")
    return SIZES[size_name]


def parse_testbed(name: str) -> tuple[str, int]:
    """(size, seed) of a `testbed:SIZE[@SEED]` model name; the size defaults to micro and the seed to 0."""
    size = name.split(":", 1)[1] or "micro"
    seed = 0
    if "@" in size:
        size, seed_text = size.split("@", 1)
        if not seed_text.isdigit():
            raise TunerError(f"model '{name}': the testbed seed after '@' must be a non-negative integer")
        seed = int(seed_text)
    return size, seed
