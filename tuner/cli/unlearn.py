"""`tuner unlearn`: one method, one setting, one model; and `apply`, the way an exported recommendation (or any
settings file) becomes the run's settings."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tuner.cli.logprogress import UnlearnLog, log_lines
from tuner.cli.render import Bars, console, out, print_result, progress
from tuner.core import flags
from tuner.core.errors import TunerError, describe_validation_error

# UnlearnConfig fields without a flag of their own: the hyperparameters have theirs (`tuner.core.flags`), LoRA has
# --lora-*, and one `tuner unlearn` process is one rank
NOT_FLAGS = {"params", "lora", "world_size", "sharding"}
DATA_ROLES = ("forget", "unseen", "retain", "general")


def read_config_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, provenance) of a settings file; an exported recommendation keeps its settings under
    `config` and brings its provenance, a plain file has none."""
    p = Path(path)
    if not p.is_file():
        raise TunerError(f"--config: file not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TunerError(f"--config: {p} is not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        return dict(doc["config"]), doc.get("provenance") or {}
    if not isinstance(doc, dict):
        raise TunerError(f"--config: {p} must hold a mapping of run settings")
    return doc, {}


def apply(config_file: str | None, given: dict[str, Any]):
    """(UnlearnConfig, the file's provenance or {}): the settings of `config_file` with the fields `given` on the
    command line over them; given hyperparameters (`params`) join the file's rather than replace them."""
    from tuner.core.hparams import LR
    from tuner.engine.unlearn import UnlearnConfig

    fields, provenance = read_config_file(config_file) if config_file else ({}, {})
    given = dict(given)
    typed = given.pop("params", None)
    fields.update(given)
    if typed:
        fields["params"] = {**(fields.get("params") or {}), **typed}
    if "method" not in fields:
        raise TunerError("--method is required (or give --config FILE)")
    if LR.name not in (fields.get("params") or {}) and LR.name not in fields:
        raise TunerError(f"{flags.flag(LR.name)} is required (or give --config FILE): the learning rate that "
                         "unlearns without wrecking utility depends on the model")
    try:
        return UnlearnConfig.model_validate(fields), provenance
    except ValidationError as err:
        raise TunerError(describe_validation_error(err, config_file or "unlearn settings")) from None


def unlearn_config(args: argparse.Namespace):
    """(run settings from --config and flags, the config file's provenance or {})."""
    given: dict[str, Any] = flags.given(args, args.setting_flags)
    typed = flags.given_hyperparameters(args)
    if typed:
        given["params"] = typed
    if args.lora_r is not None:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r}
        if args.lora_target_modules:
            lora["target_modules"] = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
        given["lora"] = lora
    return apply(args.config, given)


def own_data(args: argparse.Namespace) -> bool:
    """Whether the user named data files (then a testbed model brings none of its own)."""
    return any(getattr(args, role) for role in DATA_ROLES)


def data_spec_from_args(args: argparse.Namespace, source):
    from tuner.engine import testbed
    from tuner.engine.data import DataSpec, TextSource

    files = {role: getattr(args, role) for role in DATA_ROLES}
    if source.testbed_root is not None:
        spec = testbed.data_spec(source.testbed_root)
        if not own_data(args):
            return spec.model_copy(update={"block_size": args.block_size or spec.block_size})
        default_block = spec.block_size  # a testbed model's context is the testbed's block (as the plan assumes)
    else:
        default_block = 128
    for key in ("forget", "unseen"):
        if not files[key]:
            raise TunerError(f"--{key} is required for model '{source.name}' (only testbed models bring data)")

    def src(path: str | None):
        return TextSource(path=path, text_field=args.text_field) if path else None

    return DataSpec(forget=src(files["forget"]), unseen=src(files["unseen"]), retain=src(files["retain"]),
                    general=src(files["general"]), block_size=args.block_size or default_block)


def check_tuned_for(provenance: dict[str, Any], bench, path: str) -> None:
    """An exported configuration only transfers to a model of the architecture it was tuned on."""
    from tuner.core.fingerprint import fingerprint

    tuned = (provenance.get("model") or {}).get("fingerprint")
    here = fingerprint(bench.reference.config)
    if tuned and tuned != here:
        name = provenance["model"].get("name", "?")
        raise TunerError(f"--config: {path} was tuned for model '{name}' ({_describe(tuned)}), "
                         f"but --model is {_describe(here)}")


def _describe(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in fp.items())


def _prepare_out(path: str, overwrite: bool) -> Path:
    target = Path(path).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise TunerError(f"--out: {target} exists and is not empty (choose another or pass --overwrite)")
    if not target.parent.exists():
        raise TunerError(f"--out: parent directory {target.parent} does not exist")
    return target


def _unlearn_plan(args: argparse.Namespace, cfg, source, device):
    """The run's memory plan from the model config alone, with the GPU it is checked against."""
    from tuner.core.precision import planned_precision, resolve_precision
    from tuner.engine import memory, methods, testbed

    shape = memory.model_shape(args.model, cfg, args.trust_remote_code)
    block_size = args.block_size or (testbed.data_spec(source.testbed_root).block_size
                                     if source.testbed_root is not None else 128)
    capacity = int(args.gpu_memory_gib * memory.GIB) if args.gpu_memory_gib else memory.device_capacity(device)
    # planning here for a GPU named by --gpu-memory-gib: `auto` is what it becomes there
    precision = (resolve_precision(cfg.precision, device).name if device.type == "cuda"
                 else planned_precision(cfg.precision, on_gpu=capacity is not None))
    return memory.RunPlan.assemble(shape, [methods.get(cfg.method)], cfg, precision, block_size, capacity,
                                   gpu=capacity is not None)


def cmd_unlearn(args: argparse.Namespace) -> int:
    from tuner.core.precision import resolve_precision
    from tuner.engine.unlearn import resolve_device

    cfg, provenance = unlearn_config(args)
    if not args.dry_run and not args.out:
        raise TunerError("--out is required (or pass --dry-run to print the memory plan only)")
    target = None if args.dry_run else _prepare_out(args.out, args.overwrite)
    if args.trust_remote_code:
        console.print("[yellow]warning:[/] --trust-remote-code runs Python code shipped with the model")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    with log_lines(f"[unlearn {cfg.method}]", args.progress_every, enabled=not args.dry_run) as lines:
        return _unlearn(args, cfg, provenance, target, device, precision, UnlearnLog(lines) if lines else None)


def _unlearn(args: argparse.Namespace, cfg, provenance: dict[str, Any], target: Path | None, device, precision,
             log: UnlearnLog | None) -> int:
    """The run behind `cmd_unlearn`: plan, load, unlearn, measure, save; `log` (None on a terminal) gets the
    progress that the bars show."""
    from tuner.engine import memory, methods
    from tuner.engine.data import build_data
    from tuner.engine.evaluation import full_metrics, leak_figures
    from tuner.engine.models import Workbench, load, resolve
    from tuner.engine.unlearn import run_unlearning, verbmem_plan

    with progress() as bars_progress:
        bars = Bars(bars_progress)
        source = resolve(args.model, build_progress=bars)
        planned = _unlearn_plan(args, cfg, source, device)
    if args.dry_run:
        for line in memory.plan_lines(planned.plan):
            out.print(line, highlight=False)
    if (refused := planned.refusal(max_workers=1)) is not None:
        raise TunerError(refused)
    if args.dry_run:
        return 0
    with progress() as bars_progress:
        bars = Bars(bars_progress)
        bench = Workbench.from_source(source, args.trust_remote_code, dtype=precision.compute)
        check_tuned_for(provenance, bench, args.config)
        spec = data_spec_from_args(args, bench.source)
        data = build_data(spec, bench.tokenizer, bench.original.config, seed=cfg.seed)
        model, reference = bench.trainee(cfg, precision)

        def on_progress(step: int, total: int, logs: dict[str, float]) -> None:
            bars(f"unlearn {cfg.method}", step, total, f"loss {logs['loss']:.3f}")
            if log is not None:
                log.on_progress(step, total, logs)

        retrain = None
        # the testbed's retrain model never saw the testbed's forget set; with the user's own data it is no
        # exact retrain of anything the run forgot. Scored first: privleak is relative to it.
        if bench.source.retrain_path is not None and not own_data(args):
            if log is not None:
                log.phase("exact-retrain metrics")
            retrain_model, _ = load(resolve(str(bench.source.retrain_path)), torch_dtype=precision.compute)
            batch = memory.resolve_eval_batch(cfg, bench.original.config, [methods.get(cfg.method)], precision.name,
                                              data.block_size)  # the run's own evaluation batch
            retrain = full_metrics(retrain_model.to(device), data, batch, device, precision.compute,
                                   mink_k=cfg.mink_k, verbmem=verbmem_plan(cfg, bench.tokenizer.decode))
            retrain.update(leak_figures(retrain, retrain["mia_auc_mink"]))
            del retrain_model
        if log is not None:
            log.phase("original metrics")
        result = run_unlearning(model, data, cfg, reference=reference, on_progress=on_progress,
                                on_eval=log.on_eval if log else None, on_start=log.on_start if log else None,
                                leak_reference=(retrain or {}).get("mia_auc_mink"), decode=bench.tokenizer.decode)
    if log is not None:
        log.finish()

    report = result.to_dict()
    report.update({"model": args.model, "data": data.sources, "blocks": data.summary(), "exact_retrain": retrain})
    if result.metrics is not None and retrain is not None:
        report["targets"] = {
            "approximate_forget_nll": result.metrics["unseen_nll"],
            "exact_retrain_forget_nll": retrain["forget_nll"],
            "distance_to_approximate": result.metrics["forget_nll"] - result.metrics["unseen_nll"],
            "distance_to_exact": result.metrics["forget_nll"] - retrain["forget_nll"],
        }
    _save(target, report, model if result.metrics is not None else None, cfg, bench.tokenizer)
    print_result(result, report, retrain, target)
    return 0


def _save(target: Path, report: dict[str, Any], model, cfg, tokenizer) -> None:
    """metrics.json, and the model (None: a run that kept none) in HF format, written whole or not at all."""
    staging = Path(tempfile.mkdtemp(prefix=".unlearn-", dir=target.parent))
    try:
        if model is not None:
            # a LoRA run saves the unlearned model whole (adapters merged), like a full run
            saved = model.merge_and_unload() if cfg.lora is not None else model
            saved.save_pretrained(staging / "model")
            tokenizer.save_pretrained(staging / "model")
        (staging / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
