"""Study specifications: YAML validated into pydantic models. Configuration is data; nothing is evaluated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuner.core.errors import TunerError, describe_validation_error, one_line
from tuner.core.hparams import Hyperparameter, at_depth
from tuner.core.metrics import OBJECTIVES
from tuner.core.names import NAME_RULE, is_valid_name
from tuner.core.settings import DataSpec, QuantSettings, RelearnSettings, RetainSource, RunSettings
from tuner.engine import methods
from tuner.results.target import Target

Objective = Literal[OBJECTIVES]  # tuner.core.metrics declares what each means


class _Strict(BaseModel):
    # NaN and infinity are never a setting (`.nan` in YAML would otherwise pass every range check).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Range(_Strict):
    """A hyperparameter's search range. `log` defaults to its declaration's scale; integer knobs take whole
    bounds."""

    low: float
    high: float
    log: bool | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"empty range: low {self.low:g} > high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class PartialRange(_Strict):
    """A per-method override of some of a range's fields."""

    low: float | None = None
    high: float | None = None
    log: bool | None = None


def resolved_range(hp: Hyperparameter, *layers: dict[str, Any]) -> Range:
    """The declared default range of `hp`, overridden by each layer in turn (the study's `search`, then its
    `per_method` entry), checked against what the hyperparameter may be."""
    doc = hp.range()
    for layer in layers:
        doc.update({k: v for k, v in layer.items() if v is not None})
    rng = Range.model_validate(doc)
    if rng.log is None:
        rng.log = hp.log
    if rng.log and rng.low <= 0:
        raise ValueError(f"{hp.name}: a log-scale range needs low > 0")
    for bound in (rng.low, rng.high):
        problem = hp.problem(bound) or (hp.integer and bound != int(bound) and f"{hp.name} is searched in whole "
                                        f"numbers (got {bound:g})")
        if problem:
            raise ValueError(problem)
    return rng


class SamplerSpec(_Strict):
    """The Optuna multi-objective sampler. TPE (multivariate, constant liar) is the default: at budgets of
    a few dozen trials per method NSGA-II's generations barely start, while TPE models the front from
    its first handful of trials."""

    name: Literal["tpe", "gp", "nsga2", "nsga3", "random", "qmc"] = "tpe"
    n_startup_trials: int | None = Field(None, ge=1, description="tpe, gp: warm-up trials before modelling (spread "
                                                                  "over the ranges by a Sobol sequence)")
    population_size: int | None = Field(None, ge=2, description="nsga2/nsga3: generation size")


class Budget(_Strict):
    trials: int = Field(12, ge=1, description="trials per search unit (method, retain source)")
    wall_time_min: float | None = Field(None, gt=0,
                                       description="wall-time limit for the whole study; units take turns")


class Resources(_Strict):
    """What one trial takes. `cpus` and `gpus` are per worker; a trial of `workers` > 1 runs on Ray Train with
    that many ranks (data-parallel; `sharding: fsdp` also shards the weights) and takes workers × cpus/gpus.
    `run.batch_size` is per worker: the effective batch is batch_size × grad_accum × workers."""

    cpus: float = Field(1.0, gt=0, description="per worker")
    gpus: float = Field(0.0, ge=0, description="per worker; fractions allowed, e.g. 0.5 shares a GPU by two trials")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of each GPU the trials get, in GiB as torch and nvidia-smi count it (79 for "
        "an 80 GB H100): `study validate` and `study run` check the memory plan against it; trials always check "
        "their own GPU")
    workers: int = Field(1, ge=1, description="ranks per trial (1: one process, no Ray Train)")
    sharding: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: weights on every rank; fsdp: FSDP2 shards")

    @model_validator(mode="after")
    def _whole_gpus_when_sharded(self) -> Resources:
        if self.workers > 1 and self.gpus and self.gpus != int(self.gpus):
            raise ValueError("a trial of several workers takes whole GPUs (gpus: 1 per worker): NCCL ranks "
                             "cannot share one GPU")
        return self


class Robustness(_Strict):
    """Robustness checks of candidates (tuner/engine/robustness.py): a relearning attack and weight quantization, run
    on a trial's kept checkpoint in the trial itself (or on the Pareto candidates after the trials), and the
    seed spread of the overall recommendation (re-runs at the study's end, `tuner.study.rechecks`). Their results are
    metrics like any other: `target.relearn_limit` and `target.quant_limit` make them constraints of the search
    and of the recommendation."""

    checks: list[Literal["relearn", "quantization"]] = Field(
        default_factory=lambda: ["relearn", "quantization"], description="which checks run")
    when: Literal["in_band", "every_trial", "pareto_at_end", "off"] = Field(
        "in_band", description="in_band: in each trial whose kept checkpoint is in the target band (the ones a "
                               "recommendation can pick); every_trial; pareto_at_end: after the trials, each "
                               "Pareto candidate re-run to its step and checked; off")
    relearn: RelearnSettings = RelearnSettings()
    quantization: QuantSettings = QuantSettings()
    seeds: int = Field(3, ge=1, le=10, description="seeds the overall recommendation is run with at the end "
                                                   "(1: no seed spread)")

    def enabled(self, check: str) -> bool:
        return self.when != "off" and check in self.checks


class Calibration(_Strict):
    """The learning-rate range test run before each search unit's trials (`tuner.study.calibration`): one run
    with the lr rising geometrically step by step over the unit's declared lr range (Smith's LR range test),
    evaluated as it goes. Where the forget gap starts to move and where the utility collapses bound the lr the
    unit's search then draws from (`tuner.results.calibration.analyse`). A section of its own, not a key of
    `search`: `search` maps hyperparameter names to ranges, and a switch there would read as one."""

    # On by default: the calibrated search's first trial was in band within the utility tolerance in every measured
    # seed of GA+GD and NPO on the micro testbed and GA+GD on the small one (where TPE's random start needed a
    # median of 2 to 4 trials on micro and reached the band in 1 of 3 seeds on small); it costs about one
    # trial's time per unit first, so its hypervolume at equal wall time is lower early on (bench/
    # search_efficiency.py --part defaults, bench/README.md).
    enabled: bool = Field(True, description="calibrate each unit's lr range before its trials (false: search the "
                                             "declared range as it is)")
    steps: int | None = Field(None, ge=3, description="optimiser steps of the calibration run (default: the steps of "
                                                      "the unit's longest trial, its top epochs)")
    points: int = Field(16, ge=3, le=200, description="evaluations along the ramp (the forget gap at each; the "
                                                      "utility as run.eval_utility_every says)")

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """`calibration: false` is the short form of `calibration: {enabled: false}`."""
        return {"enabled": value} if isinstance(value, bool) else value


def ray_address_problem(address: str | None) -> str | None:
    """Ray Client (ray://) would run Ray Tune's loop, and with it the store writes, on the head node, away
    from this process's progress display: the driver must be on a node of the cluster instead."""
    if address and address.strip().startswith("ray://"):
        return ("Ray Client addresses (ray://) are not supported: run `tuner study run` on a node of the "
                "cluster with --address HEAD_IP:6379 (the GCS port), or submit it as a Ray Job "
                "(`ray job submit -- tuner study run FILE`, which sets RAY_ADDRESS)")
    return None


class StudySpec(_Strict):
    name: str
    model: str = Field(description="HF id, local directory, or testbed:micro|small")
    trust_remote_code: bool = False
    notes: str = ""
    data: DataSpec | None = Field(None, description="required unless the model is a testbed")
    methods: list[str] = Field(default_factory=lambda: list(methods.BRIEF),
                               description="default: the brief's seven; add npo, simnpo, rmu, undial, wga by name")
    retain_sources: list[RetainSource] = ["in_distribution", "general"]
    search: dict[str, PartialRange] = Field(
        default_factory=dict, description="hyperparameter -> range, for every method of the study that takes it "
                                          "(unnamed ones keep their declared range; `tuner methods` lists them)")
    per_method: dict[str, dict[str, PartialRange]] = Field(
        default_factory=dict, description="method -> hyperparameter -> range, over `search`")
    objectives: list[Objective] = ["forget_gap", "utility_drop"]
    sampler: SamplerSpec = SamplerSpec()
    budget: Budget = Budget()
    run: RunSettings = RunSettings()
    resources: Resources = Resources()
    concurrency: int = Field(2, ge=1, description="trials running at once")
    retries: int = Field(1, ge=0, le=5, description="runs more of a setting whose trial's worker died or failed")
    seed: int = 0
    storage: str | None = Field(None, description="SQLAlchemy URL; default: the user's SQLite file")
    ray_address: str | None = Field(None, description="an existing Ray cluster, HOST:PORT of its head (or auto)")
    target: Target = Target()
    robustness: Robustness = Robustness()
    calibration: Calibration = Field(
        Calibration(), description="the lr range test before each unit's search, on by default; "
                                   "`calibration: false` turns it off")
    warm_start: str | None = Field(
        None, description="an earlier study on this store, of the same model family: the finished trials of "
                          "each search unit the two share are told to this study's sampler before its first "
                          "trial, scored by this study's objectives and target (`tuner.study.warmstart`)")

    @field_validator("ray_address")
    @classmethod
    def _driver_on_the_cluster(cls, value: str | None) -> str | None:
        problem = ray_address_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("name", "warm_start")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_name(value):
            raise ValueError(NAME_RULE)
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        known = methods.available()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown method '{name}' (choose from: {', '.join(known)})")
        if not value:
            raise ValueError("name at least one method")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        if self.data is None and not self.model.startswith("testbed:"):
            raise ValueError("data: required for a model that is not a testbed")
        for name in self.per_method:
            if name not in self.methods:
                raise ValueError(f"per_method: '{name}' is not among the study's methods")
        if len(set(self.objectives)) != len(self.objectives) or not self.objectives:
            raise ValueError("objectives: name each objective once, at least one")
        if self.warm_start == self.name:
            raise ValueError(f"warm_start: '{self.name}' is this study; name an earlier one (a resumed study "
                             "keeps its own trials anyway)")
        if self.run.verbmem_blocks is not None and self.resources.workers > 1:
            raise ValueError("run.verbmem_blocks: verbatim memorisation generates in one process; a trial of "
                             f"{self.resources.workers} workers cannot score it (set it to null, or workers: 1)")
        self._check_search()
        return self

    def _check_search(self) -> None:
        """Every named hyperparameter is one a method of the study takes, and every resolved range is valid;
        errors name the field path (`search.lr`, `per_method.npo.beta`) and the method."""
        spaces = {m: methods.get(m).space() for m in self.methods}
        for name, partial in self.search.items():
            takers = {m: hp for m, space in spaces.items() for hp in space if hp.name == name}
            if not takers:
                others = [m for m, _ in methods.declared().get(name, [])]
                where = f"; {', '.join(others)} do" if others else "; no method declares it"
                raise ValueError(f"search.{name}: no method of this study ({', '.join(self.methods)}) takes "
                                 f"'{name}'{where}")
            for method, hp in takers.items():
                _checked(f"search.{name}", method, hp, _fields(partial))
        for method, ranges in self.per_method.items():
            own = {hp.name: hp for hp in spaces[method]}
            for name, partial in ranges.items():
                if name not in own:
                    raise ValueError(f"per_method.{method}.{name}: method '{method}' has no hyperparameter "
                                     f"'{name}' (it takes: {', '.join(own)})")
                _checked(f"per_method.{method}.{name}", method, own[name], _fields(self.search.get(name)),
                         _fields(partial))

    def space_for(self, method: str, depth: int | None = None) -> dict[str, Range]:
        """The method's searched ranges, one per declared hyperparameter, in declaration order. `depth`: the
        model's decoder layers (`tuner.core.fingerprint`'s "layers"), against which a depth-relative knob's
        default range is resolved (RMU's layer); without it, that range is the one declared for its source's
        model."""
        over = self.per_method.get(method, {})
        declared = methods.get(method).space()
        if depth is not None:
            declared = at_depth(declared, depth)
        return {hp.name: resolved_range(hp, _fields(self.search.get(hp.name)), _fields(over.get(hp.name)))
                for hp in declared}

    def available_retain_sources(self) -> list[str]:
        """Testbeds bring both retain sources; otherwise those the data section names."""
        if self.data is None:
            return ["in_distribution", "general"]
        return [s for s, src in (("in_distribution", self.data.retain), ("general", self.data.general)) if src]

    def units(self) -> list[tuple[str, RetainSource | None]]:
        """Search units: each method, and each retain source for methods that train on retained data."""
        available = self.available_retain_sources()
        out: list[tuple[str, RetainSource | None]] = []
        for name in self.methods:
            if methods.get(name).uses_retain:
                out.extend((name, s) for s in self.retain_sources if s in available)
            else:
                out.append((name, None))
        return out


def _checked(path: str, method: str, hp: Hyperparameter, *layers: dict[str, Any]) -> Range:
    try:
        return resolved_range(hp, *layers)
    except (ValueError, ValidationError) as err:
        reason = err.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(err, ValidationError) else err
        raise ValueError(f"{path}: {reason} (method '{method}')") from None


def _fields(partial: PartialRange | None) -> dict[str, Any]:
    return partial.model_dump() if partial is not None else {}


def unit_name(method: str, retain_source: str | None) -> str:
    return method if retain_source is None else f"{method}@{retain_source}"


def load_spec(path: str | Path, overrides: dict | None = None) -> tuple[StudySpec, str]:
    """(spec, original text); every problem is a one-line TunerError naming the file and the field path.

    YAML is read with `yaml.safe_load` only: tags such as `!!python/object` are refused, never constructed."""
    try:
        return _load_spec(Path(path), overrides)
    except TunerError as err:
        raise TunerError(one_line(str(err))) from None


def _load_spec(p: Path, overrides: dict | None) -> tuple[StudySpec, str]:
    if not p.is_file():
        raise TunerError(f"{p}: study file not found")
    try:
        text = p.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise TunerError(f"{p}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TunerError(f"{p}:{where} malformed YAML ({getattr(err, 'problem', None) or err})") from None
    except OSError as err:
        raise TunerError(f"{p}: cannot read the study file ({err.strerror or type(err).__name__})") from None
    except RecursionError:
        raise TunerError(f"{p}: malformed YAML (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise TunerError(f"{p}: a study file must be a YAML mapping")
    doc.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate_spec(doc, str(p)), text


def stored_spec(doc: dict, source: str) -> StudySpec:
    """A spec as the store holds it. Versions before per-method hyperparameters wrote every shared range into
    `search` (λ too, for studies of methods without a retain term): ranges no method of the study takes are
    dropped here rather than refused, so such studies still resume."""
    names = [m for m in doc.get("methods") or [] if m in methods.available()]
    taken = {hp.name for m in names for hp in methods.get(m).space()}
    search = doc.get("search")
    if names and isinstance(search, dict):
        doc = {**doc, "search": {k: v for k, v in search.items() if k in taken}}
    return validate_spec(doc, source)


def validate_spec(doc: dict, source: str) -> StudySpec:
    """The spec in `doc` (parsed YAML or a stored spec), or a one-line TunerError naming `source` and the field."""
    try:
        return _validate(doc, source)
    except TunerError as err:
        raise TunerError(one_line(str(err))) from None


def _validate(doc: dict, source: str) -> StudySpec:
    try:
        spec = StudySpec.model_validate(doc)
    except ValidationError as err:
        raise TunerError(describe_validation_error(err, source)) from None
    except RecursionError:
        raise TunerError(f"{source}: nested too deeply") from None
    if spec.data is not None:
        for key in ("forget", "unseen", "retain", "general"):
            src = getattr(spec.data, key)
            if src is None or src.path is None:
                continue
            try:
                resolved = _resolve(src.path, source)
                found = resolved.exists()
                if found:
                    src.path = str(resolved.resolve())  # relative to the spec file, stored absolute
            except (OSError, ValueError, RuntimeError) as err:  # NUL bytes, names too long, symlink loops
                raise TunerError(f"{source}: data.{key}.path: not a usable path ({type(err).__name__})") from None
            if not found:
                raise TunerError(f"{source}: data.{key}.path: file not found: {src.path}")
    return spec


def check_inputs(spec: StudySpec, source: str, run_model_code: bool = True) -> None:
    """What a study needs before anything is stored: every data file readable, UTF-8 and non-empty, and a
    local model directory whose tokenizer fits its embeddings. Errors are one line naming `source` and the field.

    Hub models are not contacted here, and the testbed is built (and checked) by the trials. With
    `trust_remote_code: true` the model is only checked when `run_model_code` (`study run`, not `validate`).
    Torch and transformers are imported only for what needs them (data files, a local model)."""
    problem = None if spec.ray_address else ray_address_problem(os.environ.get("RAY_ADDRESS"))
    if problem:
        raise TunerError(f"RAY_ADDRESS: {problem}")
    try:
        if spec.data is not None:
            from tuner.engine.data import read_documents

            for key in ("forget", "unseen", "retain", "general"):
                src = getattr(spec.data, key)
                if src is not None and src.path is not None:
                    read_documents(src, f"data.{key}")
        if not spec.model.startswith("testbed:") and (run_model_code or not spec.trust_remote_code):
            from tuner.engine.models import check_local_model

            check_local_model(spec.model, spec.trust_remote_code,
                              block_size=spec.data.block_size if spec.data is not None else None)
    except TunerError as err:
        raise TunerError(one_line(f"{source}: {err}")) from None


def _resolve(path: str, source: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or not Path(source).exists() else Path(source).parent / p
