"""Hyperparameters, declared once. A method's file declares its own (`UnlearningMethod.own`); the shared ones
are here. The spec's search space and its checks, Optuna's distributions, the store's params, the
recommender's distance, export and apply, `tuner unlearn` flags and the dashboards' axes, hovers and table
columns are all derived from these declarations, so a method with a new knob is one new file.

Torch-free: the CLI, the spec and the dashboards read these without loading a model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hyperparameter:
    """One searchable knob. `low`/`high`/`log` are the default search range (a spec may narrow or widen it);
    `above`/`at_least`/`at_most` bound what a value may be at all (a spec's range and an applied config are
    checked against them). `source` names the paper or code that sets the default.

    A knob about the model's layers (RMU's steered layer) sets `depth`: its default and default range are then
    declared for a model of `depth` decoder layers, as its source states them (WMDP's layer 7 of zephyr-7b's
    32), and scale with the model's depth once the model is known (`at_depth`). A value given explicitly (a
    flag, a config, a spec's range) is an absolute layer index."""

    name: str
    label: str  # axis titles and help text
    default: float
    low: float
    high: float
    log: bool = False
    integer: bool = False  # searched as whole numbers
    whole: bool | None = None  # values must be whole numbers (default: as `integer`)
    symbol: str = ""  # short column header ("λ", "β"); the name when empty
    above: float | None = None  # values must be > this
    at_least: float | None = None  # values must be >= this
    at_most: float | None = None
    depth: int | None = None  # default/low/high are for a model of this many decoder layers (see `at_depth`)
    source: str = ""
    help: str = ""

    def __post_init__(self) -> None:
        if self.log and self.above is None and self.at_least is None:
            object.__setattr__(self, "above", 0.0)  # a log-scale knob is positive unless declared otherwise
        for value in (self.default, self.low, self.high):
            problem = self.problem(value)
            if problem:
                raise ValueError(f"hyperparameter '{self.name}' declared with {problem}")

    @property
    def short(self) -> str:
        return self.symbol or self.name

    def problem(self, value: Any) -> str | None:
        """Why `value` cannot be this hyperparameter's value, or None."""
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"{self.name} must be a finite number, not {value!r}"
        if (self.integer if self.whole is None else self.whole) and value != int(value):
            return f"{self.name} must be a whole number (got {value:g})"
        if self.above is not None and not value > self.above:
            return f"{self.name} must be > {self.above:g} (got {value:g})"
        if self.at_least is not None and value < self.at_least:
            return f"{self.name} must be >= {self.at_least:g} (got {value:g})"
        if self.at_most is not None and value > self.at_most:
            return f"{self.name} must be <= {self.at_most:g} (got {value:g})"
        return None

    def at_depth(self, layers: int) -> Hyperparameter:
        """This knob for a model of `layers` decoder layers: a depth-relative default and default range scaled
        to it (rounded to the nearest layer, within 0..layers-1); any other knob as it is."""
        if self.depth is None:
            return self

        def scaled(value: float) -> int:
            return min(layers - 1, max(0, math.floor(value * layers / self.depth + 0.5)))

        return dataclasses.replace(self, default=scaled(self.default), low=scaled(self.low), high=scaled(self.high),
                                   depth=None)

    def default_text(self) -> str:
        """The default as help text prints it: "7 of 32 layers, scaled to the model's depth" for a
        depth-relative knob."""
        if self.depth is None:
            return self.format(self.default)
        return f"{self.format(self.default)} of {self.depth} layers, scaled to the model's depth"

    def coordinate(self, value: float) -> float:
        """Where `value` sits on the search axis (log10 for log-scale knobs): the recommender's distances and
        the dashboards' axes use it."""
        return math.log10(value) if self.log else float(value)

    def at(self, u: float, low: float, high: float, log: bool) -> float | int:
        """The value at position `u` in [0, 1) along the search axis [low, high] (log-spaced when `log`); for an
        integer knob, the whole number whose share of the axis holds `u`, so that evenly spread positions give
        evenly used values."""
        if self.integer:
            return min(int(high), int(low) + math.floor(u * (int(high) - int(low) + 1)))
        if log:
            return float(low * (high / low) ** u)
        return float(low + u * (high - low))

    def cast(self, value: float) -> float | int:
        return int(round(value)) if self.integer else float(value)

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.integer:
            return f"{value:g}"
        return f"{value:.2e}" if self.log and (value < 1e-2 or value >= 1e3) else f"{value:.3g}"

    def range(self) -> dict[str, Any]:
        """The default search range as the spec writes it."""
        return {"low": self.cast(self.low), "high": self.cast(self.high), "log": self.log}

    def suggest(self, trial: Any, low: float, high: float, log: bool) -> float | int:
        """Ask an Optuna trial for a value in [low, high] (the distribution follows the declaration)."""
        if self.integer:
            return trial.suggest_int(self.name, int(low), int(high), log=log)
        return trial.suggest_float(self.name, low, high, log=log)


LR = Hyperparameter(
    "lr", "learning rate", default=1e-4, low=1e-5, high=3e-3, log=True, above=0.0,
    source="brief, guideline 4: search the learning rate on a log scale first",
    help="peak learning rate of the optimiser")
EPOCHS = Hyperparameter(
    "epochs", "epochs", default=1.0, low=1, high=5, integer=True, whole=False, above=0.0,
    source="brief: passes over the forget set",
    help="passes over the forget set (fractions allowed when applied; searched as whole epochs)")
RETAIN_WEIGHT = Hyperparameter(
    "retain_weight", "retain weight λ", default=1.0, low=0.1, high=10.0, log=True, symbol="λ", at_least=0.0,
    source="brief: GA+GD and GA+KL weight their retain term by λ",
    help="λ, the weight of the retain term (0 applies a method without it; searched on a log scale)")
SHARED: tuple[Hyperparameter, ...] = (LR, EPOCHS)


def by_name(declared: Iterable[Hyperparameter]) -> dict[str, Hyperparameter]:
    return {hp.name: hp for hp in declared}


def at_depth(declared: Iterable[Hyperparameter], layers: int) -> tuple[Hyperparameter, ...]:
    """The declarations for a model of `layers` decoder layers (`Hyperparameter.at_depth`): what a study searches
    by default on that model, and the defaults a run on it takes."""
    return tuple(hp.at_depth(layers) for hp in declared)


def complete(declared: Iterable[Hyperparameter], given: Mapping[str, Any], owner: str) -> dict[str, float | int]:
    """Every declared value (defaults where `given` is silent), each checked; a name the owner does not
    declare is an error naming the owner and what it does take. A depth-relative knob that is not given is left
    out: its default depends on the model (`UnlearningMethod.prepare` fills it in)."""
    table = by_name(declared)
    unknown = [k for k in given if k not in table]
    if unknown:
        raise ValueError(f"{owner} has no hyperparameter {', '.join(map(repr, unknown))} "
                         f"(it takes: {', '.join(table)})")
    out: dict[str, float | int] = {}
    for name, hp in table.items():
        if name not in given and hp.depth is not None:
            continue
        value = given.get(name, hp.default)
        problem = hp.problem(value)
        if problem:
            raise ValueError(f"{owner}: {problem}")
        out[name] = value
    return out
