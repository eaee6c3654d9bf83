"""What a trial reports: a curve point as it goes, and one `TrialReport` at its end, which the store records
and the searcher is told. The records cross Ray Tune as flat dicts (`to_tune`), because Tune flattens nested
results before a searcher sees them; `from_tune` reads them back, so no other module spells the keys."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.core.status import BROKEN, FAILED

OBJECTIVE_PREFIX = "obj_"  # a final report carries each objective under this prefix, as Optuna is told it
CONSTRAINT_PREFIX = "constraint_"  # ... and each constraint (Optuna: <= 0 is feasible)


def objective_key(name: str) -> str:
    """The flat key under which a final report carries objective `name`."""
    return f"{OBJECTIVE_PREFIX}{name}"


@dataclass(frozen=True)
class CurveReport:
    """One evaluated checkpoint of a running trial: stored, never told to the searcher."""

    point: dict[str, Any]

    def to_tune(self) -> dict[str, Any]:
        return {"kind": "curve", "curve_point": self.point}

    @classmethod
    def from_tune(cls, result: Mapping[str, Any] | None) -> CurveReport | None:
        return cls(result["curve_point"]) if result and result.get("kind") == "curve" else None


@dataclass(frozen=True)
class TrialReport:
    """A trial's outcome: its status, the payload the store keeps (metrics, kept step, checks, curve,
    environment, or the reason it failed), and the objectives and constraints the searcher is told. An
    objective the trial did not measure is absent, never a neutral value."""

    status: str
    payload: dict[str, Any]
    objectives: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, float] = field(default_factory=dict)

    @classmethod
    def failed(cls, reason: str, objectives: tuple[str, ...], **payload: Any) -> TrialReport:
        """A trial that produced no metrics: +inf on every objective, so the searcher learns it was bad."""
        return cls(FAILED, {"reason": reason, **payload}, {name: math.inf for name in objectives})

    @property
    def broken(self) -> bool:
        """Diverged or failed: told to the searcher as FAIL."""
        return self.status in BROKEN

    @property
    def metrics(self) -> dict[str, float] | None:
        return self.payload.get("metrics")

    def to_tune(self) -> dict[str, Any]:
        return {"kind": "final", "status": self.status, "payload": self.payload,
                **{objective_key(k): v for k, v in self.objectives.items()},
                **{f"{CONSTRAINT_PREFIX}{k}": v for k, v in self.constraints.items()}}

    @classmethod
    def from_tune(cls, result: Mapping[str, Any] | None) -> TrialReport | None:
        """The final report in a Tune result, or None when the result is not one (a curve point, a trial that
        ended without reporting)."""
        if not result or result.get("kind") != "final":
            return None
        return cls(result["status"], _payload(result),
                   {k[len(OBJECTIVE_PREFIX):]: v for k, v in result.items() if k.startswith(OBJECTIVE_PREFIX)},
                   {k[len(CONSTRAINT_PREFIX):]: v for k, v in result.items()
                    if k.startswith(CONSTRAINT_PREFIX) and v is not None})


def _payload(result: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune result's payload: Tune hands searchers their results flattened ("payload/metrics/forget_gap")."""
    if "payload" in result:
        return result["payload"]
    payload: dict[str, Any] = {}
    for key, value in result.items():
        if key.startswith("payload/"):
            *path, last = key.split("/")[1:]
            node = payload
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
    return payload


Report = Callable[[CurveReport | TrialReport], None]  # where a running trial hands its reports
