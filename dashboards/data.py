"""One study read from the store into plain rows, each trial classified against the spec's target.

Outcome classes (the colours of every dashboard), with the tolerances the study was run with
(`spec['target']`):

- ``remembered``: forget gap < -gap_tolerance (the forget set is still more likely than unseen text);
- ``in_band``: |forget gap| <= gap_tolerance (the approximate-retraining target);
- ``over_unlearned``: forget gap > gap_tolerance (it now looks *less* likely than unseen text);
- ``diverged`` (a non-finite loss), ``failed`` (no metrics), ``running`` / ``interrupted``.

When MIA AUC is one of the study's objectives, a trial in the gap band whose AUC is more than
`mia_tolerance` from 0.5 is classed by the AUC's side, as the recommender does.

A *success* (what the robustness map's success window and the guideline checks count) is a trial in the
band whose utility drop is within `utility_tolerance`: a model that reached gap 0 by collapsing is no success.

Robustness checks (`tuner.engine.robustness`: the relearning attack, 4/8-bit quantization, the seed spread) are read as
stored, per candidate (trial, step), into `StudyData.checks`; a trial row whose kept checkpoint was checked
carries that check's metrics as `row["checks"]` (an empty dict otherwise).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tuner.core.hparams import LR, RETAIN_WEIGHT, SHARED, Hyperparameter
from tuner.core.metrics import band_metrics
from tuner.core.status import BROKEN, UNFINISHED
from tuner.engine import methods
from tuner.results.recommend import OK_STATUSES, outcome, succeeded
from tuner.results.target import Target
from tuner.store import Store

OUTCOMES = ("remembered", "in_band", "over_unlearned", *BROKEN)
OUTCOME_LABELS = {"remembered": "still remembered", "in_band": "in the target band", "over_unlearned": "over-unlearned",
                  "diverged": "diverged", "failed": "failed", "running": "running", "interrupted": "interrupted",
                  "in_band_damaged": "in the band, utility drop over tolerance"}
# every declared hyperparameter's label by name (the first declaration of a name that several methods declare)
PARAM_LABELS = {name: pairs[0][1].label for name, pairs in methods.declared().items()}
NO_RECOMMENDATION = "no recommendation stored yet: no trial has finished"
# the checked metrics that are a forget gap after something was done to the candidate: the attack, quantization
ATTACK_KEYS = ("relearn_gap", "quant4_gap", "quant8_gap")


def classify(row: dict[str, Any], target: dict[str, float], band: tuple[str, ...] = ()) -> str:
    """The outcome class of one trial row: the recommender's own rule, so page and export agree."""
    return outcome(row, target, band)


@dataclass
class Unit:
    """A search unit: a method, and for methods with retain data, its retain source."""

    name: str
    method: str
    retain_source: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hyperparameters(self) -> tuple[Hyperparameter, ...]:
        """What the unit's method declares (for a method this version does not know, the declarations its
        rows carry values for)."""
        if self.method in methods.available():
            return methods.space_of(self.method)
        return tuple(hp for hp in methods.space_of(self.method) if self.carries(hp))

    @property
    def axes(self) -> list[Hyperparameter]:
        """The unit's hyperparameters other than the learning rate that its rows have values for: the y axes
        of its robustness panels (the learning rate is every panel's x axis)."""
        return [hp for hp in self.hyperparameters if hp.name != LR.name and self.carries(hp)]

    def carries(self, hp: Hyperparameter) -> bool:
        return any(r["params"].get(hp.name) is not None for r in self.rows)

    def value(self, row: dict[str, Any], hp: Hyperparameter) -> float | None:
        """The row's value of `hp` when this unit's method declares it (another method's same-named knob is not
        this one)."""
        return row["params"].get(hp.name) if hp in self.hyperparameters else None

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["outcome"] not in UNFINISHED]

    @property
    def in_band(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["outcome"] == "in_band"]

    @property
    def successes(self) -> list[dict[str, Any]]:
        """In the band with the utility drop within tolerance."""
        return [r for r in self.rows if r["success"]]

    @property
    def success_rate(self) -> float | None:
        n = len(self.finished)
        return len(self.successes) / n if n else None

    @property
    def window_decades(self) -> float:
        """Width of the success window in decades of learning rate (0 for one success or none)."""
        lrs = [LR.coordinate(r["params"][LR.name]) for r in self.successes if r["params"].get(LR.name)]
        return max(lrs) - min(lrs) if lrs else 0.0


def ordered(declared: Any) -> list[Hyperparameter]:
    """Distinct declarations, the shared ones first (learning rate, epochs, λ), the rest as they come."""
    first = [*SHARED, RETAIN_WEIGHT]
    out = list(dict.fromkeys(declared))
    return sorted(out, key=lambda hp: (first.index(hp) if hp in first else len(first), out.index(hp)))


def study_axes(units: Any) -> list[Hyperparameter]:
    """Every declaration some unit's rows carry a value for, the learning rate first: the parallel-coordinates
    axes. Two methods' same-named knobs (NPO's and SimNPO's β) are two axes."""
    units = list(units)
    lr = [hp for u in units for hp in u.hyperparameters if hp.name == LR.name and u.carries(hp)]
    return ordered([*lr, *(hp for u in units for hp in u.axes)])


@dataclass
class StudyData:
    name: str
    model: str
    status: str
    notes: str
    spec: dict[str, Any]
    target: dict[str, float]
    objectives: list[str]
    baseline: dict[str, float] | None
    exact_retrain: dict[str, float] | None
    data_summary: dict[str, Any] | None
    versions: dict[str, Any] | None
    created_at: datetime | None
    updated_at: datetime | None
    rows: list[dict[str, Any]]
    units: dict[str, Unit]
    curves: dict[int, list[dict[str, Any]]]
    recommendation: dict[str, Any] | None
    recommendation_note: str | None
    # {(trial id, step): {"metrics", "details", "time_s"}}: every checked candidate, as `Store.study_checks` gives
    checks: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    # {unit: record}: each unit's lr calibration as stored with its search (`tuner.study.calibration`)
    calibrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {unit: record}: each unit's parameter importance per objective, stored at the study's end
    # (`tuner.study.importance`)
    importances: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def band(self) -> tuple[str, ...]:
        """The figures beyond the forget gap that the target band holds to a tolerance (the objectives')."""
        return band_metrics(self.objectives)

    @property
    def running(self) -> bool:
        return self.status == "running"

    def row(self, trial_id: int | None) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["id"] == trial_id), None)

    @property
    def retrain_relearn(self) -> dict[str, Any]:
        """The exact-retrain model's own relearning-attack result (testbed studies that ran the attack), or {}."""
        return (self.exact_retrain or {}).get("relearn") or {}

    def checked_candidates(self) -> list[dict[str, Any]]:
        """Every checked candidate that has an attack or quantization result, in unit and trial order: the row,
        its step, whether it is the trial's kept checkpoint, its own forget gap at that step (the trial's for
        the kept one, the curve point's otherwise) and the stored check metrics. Seed-spread-only checks are
        left out: they have no "after" gap to draw."""
        out = []
        for r in self.rows:
            kept = r["result"].get("selected_step")
            for (tid, step), check in sorted((k, v) for k, v in self.checks.items() if k[0] == r["id"]):
                metrics = check.get("metrics") or {}
                if not any(metrics.get(k) is not None for k in ATTACK_KEYS):
                    continue
                if step == kept:
                    gap = r["metrics"].get("forget_gap")
                else:
                    gap = next((p.get("forget_gap") for p in self.curves.get(tid, []) if p["step"] == step), None)
                out.append({"row": r, "step": step, "kept": step == kept, "forget_gap": gap, "metrics": metrics,
                            "details": check.get("details") or {}})
        return out

    def hyperparameters(self) -> list[Hyperparameter]:
        """One declaration per hyperparameter name the study's units declare: the trial table's columns. From
        the units (the study's searches), not only the rows so far, so the columns stay while a study runs."""
        seen: dict[str, Hyperparameter] = {}
        for unit in self.units.values():
            for hp in unit.hyperparameters:
                seen.setdefault(hp.name, hp)
        return ordered(seen.values())

    def recommended_ids(self) -> dict[str, int]:
        """unit → trial id of its recommended (or closest) trial."""
        rec = self.recommendation or {}
        return {u: r["trial_id"] for u, r in (rec.get("units") or {}).items() if r.get("trial_id") is not None}

    def overall_id(self) -> int | None:
        return ((self.recommendation or {}).get("overall") or {}).get("trial_id")

    def default_curve_trials(self, limit: int = 4) -> list[int]:
        """The overall recommendation first, then each unit's pick, then the trials closest to the target."""
        ids: list[int] = []
        picks = self.recommended_ids()
        first = [picks.get(u) for u in ("ga", "ga_gd@in_distribution")]  # the guideline 2/3 contrast
        for tid in [self.overall_id(), *first, *picks.values()]:
            if tid is not None and tid not in ids and tid in self.curves:
                ids.append(tid)
        if len(ids) < limit:
            with_gap = [r for r in self.rows if r["metrics"].get("forget_gap") is not None and r["id"] in self.curves]
            for r in sorted(with_gap, key=lambda r: abs(r["metrics"]["forget_gap"])):
                if r["id"] not in ids:
                    ids.append(r["id"])
                if len(ids) >= limit:
                    break
        return ids[:limit]


def load_study(store: Store, name: str, curves: bool = True, recommend: bool = True) -> StudyData:
    """Everything the dashboards show of one study, from the store only (raises TunerError if unknown). The
    Pareto flags and the recommendation are the ones the study driver derived and stored (`tuner.results.derived`)."""
    study = store.study(name)
    spec = study.spec or {}
    target = Target.model_validate(spec.get("target") or {}).rule(study.exact_retrain)
    objectives = list(spec.get("objectives") or ["forget_gap", "utility_drop"])
    band = band_metrics(objectives)
    rows = store.trials(name)
    checks = store.study_checks(name)
    units: dict[str, Unit] = {}
    for search in sorted(study.searches, key=lambda s: s.id):
        units[search.unit] = Unit(search.unit, search.method, search.retain_source)
    for r in rows:
        r["metrics"] = r.get("metrics") or {}
        r["params"] = r.get("params") or {}
        r["result"] = r.get("result") or {}
        r["outcome"] = classify(r, target, band)
        r["success"] = succeeded(r, target, band)
        r["map_class"] = "in_band_damaged" if r["outcome"] == "in_band" and not r["success"] else r["outcome"]
        r["pareto"] = bool(r.get("pareto"))  # the stored flag
        r["recommended"] = False
        r["checks"] = (checks.get((r["id"], r["result"].get("selected_step"))) or {}).get("metrics") or {}
        unit = units.get(r["unit"])
        if unit is None:
            unit = units[r["unit"]] = Unit(r["unit"], r["method"], r["retain_source"])
        unit.rows.append(r)
    recommendation, note = _stored_recommendation(store, name, rows) if recommend else \
        (None, "recommendation not requested")
    data = StudyData(name=study.name, model=study.model, status=study.status, notes=spec.get("notes") or "",
                     spec=spec, target=target, objectives=objectives, baseline=study.baseline,
                     exact_retrain=study.exact_retrain, data_summary=study.data_summary, versions=study.versions,
                     created_at=study.created_at, updated_at=study.updated_at, rows=rows, units=units,
                     curves=store.study_curves(study.id) if curves else {},
                     recommendation=recommendation, recommendation_note=note, checks=checks,
                     calibrations={s.unit: s.calibration for s in sorted(study.searches, key=lambda s: s.id)
                                   if s.calibration is not None},
                     importances={s.unit: s.importance for s in sorted(study.searches, key=lambda s: s.id)
                                  if s.importance is not None})
    for tid in data.recommended_ids().values():
        row = data.row(tid)
        if row is not None:
            row["recommended"] = True
    return data


def no_recommendation_note(rows: list[dict[str, Any]]) -> str:
    """Why a study has no stored recommendation."""
    if not any(r["status"] not in UNFINISHED for r in rows):
        return NO_RECOMMENDATION
    return "no recommendation stored yet: the study driver stores one as trials finish (resume the study to derive it)"


def _stored_recommendation(store: Store, name: str, rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """The recommendation the study driver stored, or None and why; the dashboards still draw without it."""
    try:
        stored = store.recommendation(name)
    except Exception as err:  # noqa: BLE001 - one broken panel must not take the whole page down
        return None, f"the stored recommendation could not be read: {type(err).__name__}: {err}"
    return (stored, None) if stored is not None else (None, no_recommendation_note(rows))


def objective_point(row: dict[str, Any], objectives: list[str]) -> list[float] | None:
    """The trial's stored (minimised) objective values, or None when it has none (diverged, failed)."""
    if row.get("status") not in OK_STATUSES:
        return None
    obj = row.get("objectives") or {}
    values = [obj.get(o) for o in objectives]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def plotted(row: dict[str, Any]) -> bool:
    """Whether a trial is a point of the Pareto figure: it finished with a forget gap and a utility drop."""
    m = row["metrics"]
    return row["status"] in OK_STATUSES and m.get("forget_gap") is not None and m.get("utility_drop") is not None


def expected_points(data: StudyData) -> dict[str, int]:
    """Points per unit the Pareto figure must show (what the browser tests check against)."""
    return {u: sum(plotted(r) for r in unit.rows) for u, unit in data.units.items()}


# ---- efficiency ----------------------------------------------------------------------------------------------

def device_seconds(row: dict[str, Any]) -> float | None:
    """Wall time × devices (world size); a CPU run counts as one device."""
    wall = row.get("wall_time_s")
    if wall is None:
        return None
    return float(wall) * int(row.get("world_size") or 1)


def tokens(row: dict[str, Any]) -> int:
    res = row["result"]
    return int(res.get("train_tokens") or 0) + int(res.get("eval_tokens") or 0)


def efficiency(data: StudyData) -> dict[str, Any]:
    """Per-trial and total cost, against an estimate of retraining from scratch.

    The retraining estimate is a *lower bound* the store can support: one pass over the retained training
    data the study knows of (every `retain_*_train` block in `data_summary`) at the training speed these
    trials measured (training seconds per token). A real model's pre-training corpus is far larger.
    """
    rows = [r for r in data.rows if device_seconds(r) is not None]
    total_s = sum(device_seconds(r) for r in rows)
    total_tokens = sum(tokens(r) for r in rows)
    train_tokens = sum(int(r["result"].get("train_tokens") or 0) for r in rows)
    train_s = sum(float(r["result"].get("train_time_s") or 0.0) * int(r.get("world_size") or 1) for r in rows)
    block = _block_tokens(rows)
    blocks = (data.data_summary or {}).get("blocks") or {}
    retain_blocks = sum(int(n) for k, n in blocks.items() if k.startswith("retain_") and k.endswith("_train"))
    retrain_tokens = retain_blocks * block if block else None
    retrain_s = retrain_tokens * train_s / train_tokens if retrain_tokens and train_tokens and train_s else None
    per_trial = [device_seconds(r) for r in rows]
    return {"rows": rows, "total_device_s": total_s, "total_tokens": total_tokens, "train_tokens": train_tokens,
            "median_trial_s": statistics.median(per_trial) if per_trial else None,
            "median_trial_tokens": statistics.median([tokens(r) for r in rows]) if rows else None,
            "block_tokens": block, "retain_blocks": retain_blocks, "retrain_tokens": retrain_tokens,
            "retrain_device_s": retrain_s,
            "retrain_basis": (f"lower bound: one pass over the {retain_blocks:,} retained training blocks "
                              f"({retrain_tokens:,} tokens) this study knows of, at the measured training speed; "
                              "a real pre-training corpus is far larger") if retrain_tokens else
                             "no estimate: the store has no data summary or no trial trained"}


def _block_tokens(rows: list[dict[str, Any]]) -> int | None:
    """Tokens per block, from any trial that trained: train tokens / (steps × micro-batches × batch size)."""
    for r in rows:
        res = r["result"]
        env = res.get("environment") or {}
        steps, toks = res.get("steps_done"), res.get("train_tokens")
        per_step = int(env.get("batch_size") or 0) * int(env.get("grad_accum") or 1)
        if steps and toks and per_step:
            return round(toks / (steps * per_step))
    return None


# ---- formatting shared by the figures, the app and the report ------------------------------------------------

def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


@dataclass(frozen=True)
class Column:
    """One trial-table column: its key in `table_rows`' records, its header, whether it sorts and filters as
    a number, and for a hyperparameter its declaration (which formats its cells)."""

    key: str
    label: str
    numeric: bool = False
    param: Hyperparameter | None = None


_BEFORE = (Column("id", "trial", True), Column("unit", "unit"), Column("number", "#", True),
           Column("status", "status"), Column("outcome", "outcome"), Column("pareto", "Pareto"),
           Column("recommended", "picked"))
_AFTER = (Column("forget_gap", "forget gap", True), Column("utility_drop", "utility drop", True),
          Column("mia_auc", "MIA AUC", True), Column("privleak", "privleak %", True),
          Column("forget_em", "forget EM", True), Column("forget_es", "forget ES", True),
          Column("forget_nll", "forget NLL", True),
          Column("unseen_nll", "unseen NLL", True), Column("retain_nll", "retain NLL", True),
          Column("steps", "steps", True), Column("stop_step", "stop step", True),
          Column("selected_step", "selected step", True), Column("device_s", "device-s", True),
          Column("tokens", "tokens", True), Column("device", "device"), Column("effective_batch", "eff. batch", True),
          Column("world_size", "world", True), Column("sharding", "sharding"), Column("precision", "precision"),
          Column("error", "error or stop reason"))
_FIXED = {c.key for c in (*_BEFORE, *_AFTER)}


def param_key(hp: Hyperparameter) -> str:
    """A hyperparameter's column key: its name (prefixed in the unlikely case it is a fixed column's key)."""
    return hp.name if hp.name not in _FIXED else f"param_{hp.name}"


def table_columns(data: StudyData | None = None) -> list[Column]:
    """The trial table's columns: one per hyperparameter the study's units declare (header: its symbol or
    name), between the trial's identity and its metrics. Without a study, one per declared hyperparameter."""
    declared = data.hyperparameters() if data is not None else \
        ordered(pairs[0][1] for pairs in methods.declared().values())
    return [*_BEFORE, *(Column(param_key(hp), hp.short, True, hp) for hp in declared), *_AFTER]


def table_rows(data: StudyData) -> list[dict[str, Any]]:
    """The sortable trial table: one flat record per trial (numbers stay numbers, so sorting is numeric)."""
    params = data.hyperparameters()
    out = []
    for r in data.rows:
        m, p, res = r["metrics"], r["params"], r["result"]
        out.append({
            "id": r["id"], "unit": r["unit"], "number": r["number"], "status": r["status"],
            "outcome": OUTCOME_LABELS.get(r["map_class"], r["map_class"]),
            "pareto": "yes" if r["pareto"] else "", "recommended": "yes" if r["recommended"] else "",
            **{param_key(hp): p.get(hp.name) for hp in params},
            "forget_gap": _round(m.get("forget_gap")), "utility_drop": _round(m.get("utility_drop")),
            "mia_auc": _round(m.get("mia_auc")), "privleak": _round(m.get("privleak"), 2),
            "forget_em": _round(m.get("forget_em")), "forget_es": _round(m.get("forget_es")),
            "forget_nll": _round(m.get("forget_nll")),
            "unseen_nll": _round(m.get("unseen_nll")), "retain_nll": _round(m.get("retain_nll")),
            "steps": res.get("steps_done"), "stop_step": res.get("stop_step"), "selected_step": res.get("selected_step"),
            "device_s": _round(device_seconds(r), 2), "tokens": tokens(r) or None, "device": r.get("device"),
            "effective_batch": r.get("effective_batch"), "world_size": r.get("world_size"),
            "precision": (res.get("environment") or {}).get("precision"),
            "sharding": (res.get("environment") or {}).get("sharding"), "error": r.get("error") or "",
        })
    return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)
