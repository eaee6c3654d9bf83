"""The registry of unlearning methods: every module in this package that subclasses
`UnlearningMethod` and decorates it with `@register` is found here, so an eighth method is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from tuner.core.errors import TunerError
from tuner.core.hparams import Hyperparameter
from tuner.engine.methods.base import Batch, MethodContext, UnlearningMethod

_REGISTRY: dict[str, type[UnlearningMethod]] = {}
# the brief's seven, in its order: listed first, and what a study runs when it names no methods (the others,
# e.g. RMU with its model-specific layer, are chosen by name)
BRIEF = ("ga", "random_label", "random_model_label", "adversarial", "retain_finetune", "ga_gd", "ga_kl")
_DISCOVERED = False


def register(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are registered as '{cls.name}'")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> dict[str, type[UnlearningMethod]]:
    """All methods by name, in the brief's order first and any added ones after."""
    if not _DISCOVERED:
        _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (BRIEF.index(kv[0]) if kv[0] in BRIEF else 99, kv[0])))


def declared() -> dict[str, list[tuple[str, Hyperparameter]]]:
    """Every hyperparameter name with the methods that declare it and each one's declaration (a name such as
    β means a different knob in NPO and in WGA)."""
    out: dict[str, list[tuple[str, Hyperparameter]]] = {}
    for name, cls in available().items():
        for hp in cls.space():
            out.setdefault(hp.name, []).append((name, hp))
    return out


def space_of(method: str | None) -> tuple[Hyperparameter, ...]:
    """The method's declared hyperparameters; for a method this version no longer has, every declaration
    (first of each name), so rows of older stores still read."""
    if method in available():
        return get(method).space()
    return tuple(pairs[0][1] for pairs in declared().values())


def describe(method: str | None, params: dict) -> str:
    """"lr 2.87e-03, epochs 3, λ 0.5": a setting as tables, hovers and summaries print it."""
    return ", ".join(f"{hp.short} {hp.format(params[hp.name])}" for hp in space_of(method)
                     if params.get(hp.name) is not None)


def get(name: str) -> type[UnlearningMethod]:
    methods = available()
    if name not in methods:
        raise TunerError(f"unknown method '{name}' (choose from: {', '.join(methods)})")
    return methods[name]


__all__ = ["Batch", "MethodContext", "UnlearningMethod", "available", "declared", "describe", "get", "register",
           "space_of"]
