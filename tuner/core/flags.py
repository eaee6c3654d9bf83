"""Command-line flags derived from the declarations they set: one flag per field of a settings model
(`RunSettings`, `UnlearnConfig`) and one per declared hyperparameter, so a new setting or a new method's knob
is a flag without a second declaration here."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tuner.core.hparams import Hyperparameter

HP_DEST = "hp_"  # argparse dest prefix of hyperparameter flags (a knob may share a name with a setting)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(annotation: Any) -> tuple[type | None, list[Any] | None]:
    """(type, choices) of a field that a flag can set; (None, None) for nested models and containers."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar(options[0]) if len(options) == 1 else (None, None)
    if get_origin(annotation) is Literal:
        return str, list(get_args(annotation))
    if annotation in (bool, int, float, str):
        return annotation, None
    return None, None


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> list[str]:
    """A flag per scalar field of `model` (help from its description and default); returns their names.
    Every flag defaults to None, so only what the user typed overrides a config file."""
    names = []
    for name, info in model.model_fields.items():
        kind, choices = _scalar(info.annotation)
        if name in skip or kind is None:
            continue
        default = "" if info.default in (PydanticUndefined, None) else f" (default {info.default})"
        # argparse %-formats help text: a literal % (Min-K%) must be doubled
        text = ((info.description or name.replace("_", " ")) + default).replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag(name), dest=name, type=kind, choices=choices, default=None, help=text)
        names.append(name)
    return names


def add_hyperparameter_flags(parser: argparse.ArgumentParser, declared: dict[str, list[tuple[str, Hyperparameter]]]
                             ) -> None:
    """A flag per hyperparameter name; its help lists each method's meaning and default (β is NPO's inverse
    temperature and WGA's exponent, with different defaults)."""
    for name, pairs in declared.items():
        by_decl: dict[int, tuple[Hyperparameter, list[str]]] = {}
        for method, hp in pairs:
            by_decl.setdefault(id(hp), (hp, []))[1].append(method)
        parts = [f"{hp.label}, default {hp.default_text()}"
                 + (f" ({', '.join(ms)})" if len(by_decl) > 1 or len(ms) < 3 else "")
                 for hp, ms in by_decl.values()]
        whole = all(hp.integer and hp.whole is not False for _, hp in pairs)
        parser.add_argument(flag(name), dest=HP_DEST + name, metavar=name.upper(), type=int if whole else float,
                            default=None, help="; ".join(parts).replace("%", "%%"))


def given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The settings flags the user typed."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def given_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len(HP_DEST):]: v for k, v in vars(args).items() if k.startswith(HP_DEST) and v is not None}
