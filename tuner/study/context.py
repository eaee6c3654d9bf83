"""The trial context: everything a trial of a study needs, built once by the study driver from the spec and
shipped whole (through Ray's object store) to every trial, rank and re-run.

It holds the validated settings as typed records (`RunSettings`, `Target`, `Robustness`), so no worker
validates a dict again. The device and precision are resolved where the trial runs, once per process: the
driver may have no GPU while its workers do, so they are never computed on the driver or pickled with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from tuner.core.settings import DataSpec, RunSettings
from tuner.engine.memory import gpu_share
from tuner.results.target import Target
from tuner.study.spec import Robustness, StudySpec, unit_name

if TYPE_CHECKING:
    import torch

    from tuner.core.precision import PrecisionPlan
    from tuner.engine.unlearn import UnlearnConfig

_RESOLVED = ("device", "precision")  # cached per process where the trial runs, never shipped


@dataclass(frozen=True)
class Unit:
    """A search unit: one method, with the retain source it trains on (None for methods without one)."""

    method: str
    retain_source: str | None


@dataclass(frozen=True)
class TrialContext:
    model: str
    trust_remote_code: bool
    data: DataSpec | None  # None: the testbed's own sets
    seed: int
    units: dict[str, Unit]
    run: RunSettings
    objectives: tuple[str, ...]
    target: Target
    robustness: Robustness
    threads: int  # torch threads per worker process
    gpu_share: float  # the share of a GPU's memory one trial may use
    workers: int  # ranks per trial
    sharding: str
    cpus: float  # per worker
    gpus: float  # per worker

    @classmethod
    def of(cls, spec: StudySpec) -> TrialContext:
        r = spec.resources
        return cls(model=spec.model, trust_remote_code=spec.trust_remote_code, data=spec.data, seed=spec.seed,
                   units={unit_name(m, s): Unit(m, s) for m, s in spec.units()}, run=spec.run,
                   objectives=tuple(spec.objectives), target=spec.target, robustness=spec.robustness,
                   threads=max(1, int(r.cpus)), gpu_share=gpu_share(r.gpus), workers=r.workers,
                   sharding=r.sharding, cpus=r.cpus, gpus=r.gpus)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _RESOLVED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @cached_property
    def device(self) -> torch.device:
        from tuner.engine.unlearn import resolve_device

        return resolve_device(self.run.device)

    @cached_property
    def precision(self) -> PrecisionPlan:
        from tuner.core.precision import resolve_precision

        return resolve_precision(self.run.precision, self.device)

    @property
    def shards(self) -> int:
        """How many ranks share the weights: all of them under FSDP, none under DDP."""
        return self.workers if self.sharding == "fsdp" else 1

    def config(self, unit: str, params: dict[str, Any]) -> UnlearnConfig:
        """The run settings of one trial of `unit` at the searcher's `params`, with the target's tolerances its
        early stops measure against."""
        from tuner.engine.unlearn import UnlearnConfig

        u = self.units[unit]
        return UnlearnConfig(method=u.method, retain_source=u.retain_source or "in_distribution", seed=self.seed,
                             params=params, world_size=self.workers, sharding=self.sharding,
                             gap_tolerance=self.target.gap_tolerance,
                             utility_tolerance=self.target.utility_tolerance, **self.run.model_dump())

    def rule(self, exact_retrain: dict[str, Any] | None) -> dict[str, Any]:
        """The recommender's target, measured from the exact-retrain model's values where there are some."""
        return self.target.rule(exact_retrain)
