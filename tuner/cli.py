"""The `tuner` command line. User mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tuner import flags
from tuner.errors import TunerError, describe_validation_error, one_line

# Piped output (logs, CI) gets wide tables instead of rich's 80-column fallback.
console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
out = Console() if sys.stdout.isatty() else Console(width=160)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=True)


class _Bars:
    """A named rich task per label, fed by the (label, done, total) callbacks of the library."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.tasks = progress, {}

    def __call__(self, label: str, done: int, total: int, info: str = "") -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total, info="")
        self.progress.update(self.tasks[label], completed=done, total=total, info=info)


# ---- tuner methods -----------------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from tuner import methods

    table = Table(title="unlearning methods")
    for col in ("name", "hyperparameters (default)", "forget term", "retain term", "needs original"):
        table.add_column(col, no_wrap=True)
    table.add_column("summary")
    for name, cls in methods.available().items():
        retain = "λ-weighted" if cls.has_retain_term else ("yes" if cls.uses_retain else "-")
        knobs = ", ".join(f"{hp.name}={hp.format(hp.default)}" for hp in cls.space())
        table.add_row(name, knobs, "yes" if cls.uses_forget else "-", retain,
                      "yes" if cls.needs_reference else "-", cls.summary)
    out.print(table)
    return 0


# ---- tuner testbed -----------------------------------------------------------------------------------------

def cmd_testbed_build(args: argparse.Namespace) -> int:
    from tuner import testbed

    with _progress() as progress:
        root = testbed.build(args.size, seed=args.seed, force=args.force, progress=_Bars(progress))
    _print_manifest(root)
    return 0


def _print_manifest(root: Path) -> None:
    from tuner import testbed

    m = testbed.load_manifest(root)
    out.print(f"testbed [bold]{m['size_name']}[/] (seed {m['seed']}) at {root}")
    out.print(f"  model: {m['size']['arch']}, {m['parameters']:,} parameters; built in {m['build_seconds']} s")
    out.print("  files: " + ", ".join(f"{role} {len(v)}" for role, v in m["files"].items()))
    table = Table("model", "forget NLL", "unseen NLL", "retain NLL", "general NLL", "forget gap")
    for name, nll in m["nll"].items():
        label = "pre-trained (forget seen)" if name == "model" else "exact retrain (forget never seen)"
        table.add_row(label, *(f"{nll[k]:.3f}" for k in ("forget", "unseen", "retain", "general")),
                      f"{nll['forget'] - nll['unseen']:+.3f}")
    out.print(table)


def cmd_testbed_show(args: argparse.Namespace) -> int:
    from tuner import testbed

    root = testbed.build(args.size, seed=args.seed)
    _print_manifest(root)
    return 0


# ---- tuner unlearn -----------------------------------------------------------------------------------------

# UnlearnConfig fields without a flag of their own: the hyperparameters have theirs (`tuner.flags`), LoRA has
# --lora-*, and one `tuner unlearn` process is one rank
NOT_FLAGS = {"params", "lora", "world_size", "sharding"}


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TunerError(f"--config: file not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TunerError(f"--config: {p} is not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        doc = {**doc["config"], "__provenance__": doc.get("provenance") or {}}  # an exported recommendation
    if not isinstance(doc, dict):
        raise TunerError(f"--config: {p} must hold a mapping of run settings")
    return doc


def unlearn_config(args: argparse.Namespace):
    """(run settings from --config and flags, the config file's provenance or {})."""
    from tuner.hparams import LR
    from tuner.unlearn import UnlearnConfig

    fields: dict[str, Any] = _read_config_file(args.config) if args.config else {}
    provenance = fields.pop("__provenance__", {})
    fields.update(flags.given(args, args.setting_flags))
    typed = flags.given_hyperparameters(args)
    if typed:
        fields["params"] = {**(fields.get("params") or {}), **typed}
    if args.lora_r is not None:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r}
        if args.lora_target_modules:
            lora["target_modules"] = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
        fields["lora"] = lora
    if "method" not in fields:
        raise TunerError("--method is required (or give --config FILE)")
    if LR.name not in (fields.get("params") or {}) and LR.name not in fields:
        raise TunerError(f"{flags.flag(LR.name)} is required (or give --config FILE): the learning rate that "
                         "unlearns without wrecking utility depends on the model")
    try:
        return UnlearnConfig.model_validate(fields), provenance
    except ValidationError as err:
        raise TunerError(describe_validation_error(err, args.config or "unlearn settings")) from None


def data_spec_from_args(args: argparse.Namespace, source):
    from tuner import testbed
    from tuner.data import DataSpec, TextSource

    flags = {k: getattr(args, k) for k in ("forget", "unseen", "retain", "general")}
    if source.testbed_root is not None and not any(flags.values()):
        spec = testbed.data_spec(source.testbed_root)
        return spec.model_copy(update={"block_size": args.block_size or spec.block_size})
    for key in ("forget", "unseen"):
        if not flags[key]:
            raise TunerError(f"--{key} is required for model '{source.name}' (only testbed models bring data)")

    def src(path: str | None):
        return TextSource(path=path, text_field=args.text_field) if path else None

    return DataSpec(forget=src(flags["forget"]), unseen=src(flags["unseen"]), retain=src(flags["retain"]),
                    general=src(flags["general"]), block_size=args.block_size or 128)


def _check_tuned_for(provenance: dict[str, Any], bench, path: str) -> None:
    """An exported configuration only transfers to a model of the architecture it was tuned on."""
    from tuner.models import fingerprint

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


def _metric_table(result, retrain: dict[str, float] | None) -> Table:
    table = Table(title=f"{result.config['method']}: {result.status}")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("unlearned", justify="right")
    if retrain is not None:
        table.add_column("exact retrain", justify="right")
    rows = [("forget NLL", "forget_nll"), ("unseen NLL", "unseen_nll"), ("retain NLL", "retain_nll"),
            ("general NLL", "general_nll"), ("forget gap (forget − unseen)", "forget_gap"),
            ("MIA AUC min-k (0.5 = unlearned)", "mia_auc_mink"), ("MIA AUC loss", "mia_auc_loss"),
            ("MIA AUC zlib", "mia_auc_zlib")]
    after = result.metrics or {}
    for label, key in rows:
        if key not in result.baseline:
            continue
        cells = [label, f"{result.baseline[key]:.4f}", f"{after[key]:.4f}" if key in after else "-"]
        if retrain is not None:
            cells.append(f"{retrain[key]:.4f}" if key in retrain else "-")
        table.add_row(*cells)
    return table


def _unlearn_plan(args: argparse.Namespace, cfg, source, device):
    """The run's memory plan from the model config alone, with the GPU it is checked against."""
    from tuner import memory, methods, testbed
    from tuner.precision import planned_precision, resolve_precision

    shape = memory.model_shape(args.model, cfg, args.trust_remote_code)
    block_size = args.block_size or (testbed.data_spec(source.testbed_root).block_size
                                     if source.testbed_root is not None else 128)
    capacity = int(args.gpu_memory_gib * memory.GIB) if args.gpu_memory_gib else memory.device_capacity(device)
    # planning here for a GPU named by --gpu-memory-gib: `auto` is what it becomes there
    precision = (resolve_precision(cfg.precision, device).name if device.type == "cuda"
                 else planned_precision(cfg.precision, on_gpu=capacity is not None))
    run = memory.run_shape([methods.get(cfg.method)], cfg, precision, block_size, gpu=capacity is not None)
    return shape, run, memory.plan(shape, run, capacity)


def cmd_unlearn(args: argparse.Namespace) -> int:
    from tuner import memory
    from tuner.data import build_data
    from tuner.evaluation import full_metrics
    from tuner.models import Workbench, load, resolve
    from tuner.precision import resolve_precision
    from tuner.unlearn import resolve_device, run_unlearning

    cfg, provenance = unlearn_config(args)
    if not args.dry_run and not args.out:
        raise TunerError("--out is required (or pass --dry-run to print the memory plan only)")
    target = None if args.dry_run else _prepare_out(args.out, args.overwrite)
    if args.trust_remote_code:
        console.print("[yellow]warning:[/] --trust-remote-code runs Python code shipped with the model")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    with _progress() as progress:
        bars = _Bars(progress)
        source = resolve(args.model, build_progress=bars)
        shape, run, plan = _unlearn_plan(args, cfg, source, device)
    if args.dry_run:
        for line in memory.plan_lines(plan):
            out.print(line, highlight=False)
    if not plan.fits:
        raise TunerError(memory.refusal(shape, run, plan.capacity))
    if args.dry_run:
        return 0
    with _progress() as progress:
        bars = _Bars(progress)
        bench = Workbench.from_source(source, args.trust_remote_code, dtype=precision.compute)
        _check_tuned_for(provenance, bench, args.config)
        spec = data_spec_from_args(args, bench.source)
        data = build_data(spec, bench.tokenizer, bench.original.config, seed=cfg.seed)
        model, reference = bench.trainee(cfg, precision)

        def on_progress(step: int, total: int, logs: dict[str, float]) -> None:
            bars(f"unlearn {cfg.method}", step, total, f"loss {logs['loss']:.3f}")

        result = run_unlearning(model, data, cfg, reference=reference, on_progress=on_progress)
        retrain = None
        if bench.source.retrain_path is not None:
            retrain_model, _ = load(resolve(str(bench.source.retrain_path)), torch_dtype=precision.compute)
            retrain = full_metrics(retrain_model.to(device), data, cfg.eval_batch_size, device, precision.compute)

    report = result.to_dict()
    report.update({"model": args.model, "data": data.sources, "blocks": data.summary(), "exact_retrain": retrain})
    if result.metrics is not None and retrain is not None:
        report["targets"] = {
            "approximate_forget_nll": result.metrics["unseen_nll"],
            "exact_retrain_forget_nll": retrain["forget_nll"],
            "distance_to_approximate": result.metrics["forget_nll"] - result.metrics["unseen_nll"],
            "distance_to_exact": result.metrics["forget_nll"] - retrain["forget_nll"],
        }
    staging = Path(tempfile.mkdtemp(prefix=".unlearn-", dir=target.parent))
    try:
        if result.metrics is not None:
            # a LoRA run saves the unlearned model whole (adapters merged), like a full run
            saved = model.merge_and_unload() if cfg.lora is not None else model
            saved.save_pretrained(staging / "model")
            bench.tokenizer.save_pretrained(staging / "model")
        (staging / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_result(result, report, retrain, target)
    return 0


def _memory_text(mem: dict[str, Any]) -> str:
    if not mem:
        return ""
    text = f"; memory plan {mem['plan_gib']['total']:.2f} GiB"
    return text + (f", measured peak {mem['peak_gib']:.2f} GiB" if mem.get("peak_gib") is not None else "")


def _print_result(result, report: dict, retrain: dict | None, target: Path) -> None:
    out.print(_metric_table(result, retrain))
    env = result.environment
    out.print(f"steps {result.steps_done}/{result.planned_steps}, kept step {result.selected_step}"
              + (f", reached the approximate-retraining point at step {result.stop_step}" if result.stop_step else "")
              + f"; {result.wall_time_s:.1f} s on {env['device']}, effective batch "
              f"{env['effective_batch']}, {result.train_tokens:,} training tokens")
    out.print(f"precision {env['precision']} (weights {env['weights_dtype']}, compute {env['compute_dtype']}), "
              f"optimizer {env['optimizer']}" + (f", LoRA r={env['lora']['r']}" if env.get("lora") else "")
              + _memory_text(env.get("memory") or {}))
    if result.status == "diverged":
        out.print(f"[red]diverged[/]: {result.reason}; no model saved")
    elif result.metrics is not None:
        m = result.metrics
        out.print(f"utility drop (retain NLL vs original): {m.get('utility_drop', float('nan')):+.4f}")
        if "targets" in report:
            t = report["targets"]
            out.print(f"target check: approximate target (unseen NLL) {t['approximate_forget_nll']:.4f}, "
                      f"exact-retrain forget NLL {t['exact_retrain_forget_nll']:.4f}; unlearned forget NLL is "
                      f"{t['distance_to_approximate']:+.4f} from the approximate and {t['distance_to_exact']:+.4f} "
                      "from the exact target")
    out.print(f"saved to {target}" + (" (model/ and metrics.json)" if result.metrics is not None else " (metrics.json)"))


# ---- tuner study ------------------------------------------------------------------------------------------

def _store(args: argparse.Namespace, spec_storage: str | None = None, create: bool = True):
    """create=False: commands that only read (or continue) studies never create a store or its tables."""
    from tuner.store import Store, default_url, normalise_url

    args.store_url = normalise_url(args.storage or spec_storage or default_url())  # for the error paths in main()
    return Store(args.storage or spec_storage, create=create)


class _StudyBars:
    """One progress bar per search unit: trials finished, running, failed, and the best point so far."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.tasks = progress, {}

    def __call__(self, unit: str, info: dict[str, Any]) -> None:
        best = info.get("best")
        text = f"running {info['running']}, failed {info['failed']}"
        if info.get("waiting"):
            text += f"; {info['waiting']}"
        if best:
            text += f"; closest |gap| {abs(best['forget_gap']):.3f} (utility drop {best['utility_drop']:+.3f})"
        if unit not in self.tasks:
            self.tasks[unit] = self.progress.add_task(unit, total=info["budget"], info="")
        self.progress.update(self.tasks[unit], completed=info["finished"], info=text)


def _run_study(spec, text: str, store, resume: bool) -> int:
    from tuner.orchestrator import run_study
    from tuner.store import default_url, normalise_url, safe_url

    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as progress:
        try:
            outcome = run_study(spec, text, store, resume=resume, on_event=_StudyBars(progress))
        except BaseException:
            progress.live.transient = True  # a stopped or failed study ends in its one line, not the bars
            raise
    _print_study(store, spec.name)
    recommendation = outcome.recommendation
    out.print(f"study [bold]{escape(outcome.name)}[/] finished; store: {safe_url(store.url)}")
    out.print("Pareto front size per method: " + ", ".join(f"{u} {n}" for u, n in outcome.pareto_sizes.items()))
    _print_recommendation(recommendation, spec.target.model_dump(), store.study(spec.name).exact_retrain)
    storage_flag = "" if store.url == normalise_url(default_url()) else f" --storage {safe_url(store.url)}"
    out.print(f"dashboard: tuner dashboard{storage_flag}  (then open http://127.0.0.1:8050/study/{spec.name}); "
              f"export: tuner export {spec.name}{storage_flag} -o recommended.yaml")
    return 0


def _print_recommendation(rec: dict[str, Any], target: dict[str, float], exact: dict[str, float] | None) -> None:
    from tuner.methods import describe

    table = Table(title="recommendation per search unit (target: |forget gap| ≤ "
                  f"{target['gap_tolerance']}; robust = neighbours also succeed)")
    for col in ("unit", "status", "trial", "step", "setting", "forget gap", "utility drop", "robustness",
                "window (decades)", "reason"):
        table.add_column(col)
    for unit, r in rec["units"].items():
        m = r.get("metrics") or {}
        table.add_row(unit, r["status"], str(r.get("number", "-")), str(r.get("step", "-")),
                      describe(unit.split("@")[0], r.get("params") or {}) or "-",
                      f"{m['forget_gap']:+.3f}" if m.get("forget_gap") is not None else "-",
                      f"{m['utility_drop']:+.3f}" if m.get("utility_drop") is not None else "-",
                      f"{r['robustness']:.2f}" if r.get("robustness") is not None else "-",
                      f"{r.get('window_width', 0):.2f}", escape(r["reason"]))
    out.print(table)
    from tuner.recommend import robustness_line

    for unit, r in rec["units"].items():
        line = robustness_line(r, exact, target)
        if line:
            out.print(f"robustness of {escape(unit)} (trial {r.get('number')}, step {r.get('step')}): {escape(line)}")
    o = rec["overall"]
    if o.get("trial_id") is None:
        out.print(f"overall: {o['reason']}")
        return
    m = o["metrics"]
    line = (f"overall recommendation: [bold]{o['unit']}[/] trial {o['number']} step {o.get('step')} "
            f"({describe(o['unit'].split('@')[0], o['params'])}): forget gap {m['forget_gap']:+.3f}, "
            f"utility drop {m['utility_drop']:+.3f}")
    if exact:
        line += (f"; forget NLL {m['forget_nll']:.3f} vs exact-retrain {exact['forget_nll']:.3f} "
                 f"and approximate target (unseen) {m['unseen_nll']:.3f}")
    out.print(line)


def _warn_remote_code(spec) -> None:
    if spec.trust_remote_code:
        console.print(f"[yellow]warning:[/] trust_remote_code: true runs Python code shipped with model "
                      f"'{escape(spec.model)}' in every trial", highlight=False, soft_wrap=True)


def cmd_study_run(args: argparse.Namespace) -> int:
    from tuner.spec import check_inputs, load_spec

    overrides = {"name": args.name, "storage": args.storage, "ray_address": args.address}
    spec, text = load_spec(args.file, overrides)
    args.study_name = spec.name  # main() names it in the resume command if the run stops
    if args.trials is not None:
        if args.trials < 1:
            raise TunerError("--trials must be at least 1")
        spec.budget.trials = args.trials
    _warn_remote_code(spec)
    check_inputs(spec, args.file)  # bad data or model: refused before the study is stored
    plan = _study_plan(spec)
    if plan is not None and plan.refusal():
        raise TunerError(f"{args.file}: {plan.refusal()}")
    store = _store(args, spec.storage)
    return _run_study(spec, text, store, resume=False)


def cmd_study_resume(args: argparse.Namespace) -> int:
    from tuner.spec import stored_spec

    args.study_name = args.name
    store = _store(args, create=False)
    study = store.study(args.name)
    spec = stored_spec(study.spec, f"stored spec of '{args.name}'")
    _warn_remote_code(spec)
    if args.address:
        spec.ray_address = args.address
    return _run_study(spec, study.spec_text, store, resume=True)


def cmd_study_validate(args: argparse.Namespace) -> int:
    from tuner.memory import plan_lines as memory_lines
    from tuner.spec import check_inputs, load_spec, unit_name

    spec, _ = load_spec(args.file)
    _warn_remote_code(spec)
    check_inputs(spec, args.file, run_model_code=False)  # validating never runs a model repo's code
    units = [unit_name(m, s) for m, s in spec.units()]
    out.print(f"{args.file}: valid study '{spec.name}' on {spec.model}: {len(units)} search units "
              f"({', '.join(units)}), {spec.budget.trials} trials each, sampler {spec.sampler.name}, "
              f"objectives {', '.join(spec.objectives)}")
    if spec.trust_remote_code:
        out.print("memory plan: not made (it would run the model repository's code; `study run` makes it)")
        return 0
    plan = _study_plan(spec)
    if plan is not None:
        for line in memory_lines(plan.plan):
            out.print(line, highlight=False)
        if plan.refusal():
            raise TunerError(f"{args.file}: {plan.refusal()}")
    return 0


def _study_plan(spec):
    """The study's memory plan (None when a hub model's config cannot be read here, e.g. offline: then each
    trial checks the plan against its own GPU before loading)."""
    from tuner.memory import plan_study

    try:
        return plan_study(spec)
    except TunerError:
        if Path(spec.model).expanduser().exists() or spec.model.startswith("testbed:"):
            raise
        console.print(f"[yellow]note:[/] no memory plan: the config of hub model '{escape(spec.model)}' is not in the "
                      "local HF cache (`tuner unlearn --model ID --dry-run` fetches it); each trial checks its GPU",
                      highlight=False, soft_wrap=True)
        return None


def cmd_study_list(args: argparse.Namespace) -> int:
    store = _store(args, create=False)
    table = Table("name", "model", "status", "finished trials", "created")
    for row in store.list_studies():
        table.add_row(escape(row["name"]), escape(row["model"]), row["status"], str(row["trials"]),
                      f"{row['created_at']:%Y-%m-%d %H:%M}")
    out.print(table)
    return 0


def _print_study(store, name: str) -> None:
    from tuner.methods import describe

    rows = store.trials(name)
    table = Table(title=f"trials of {escape(name)}")
    for col in ("id", "unit", "#", "status", "setting", "forget gap", "utility drop", "MIA AUC", "steps (kept)",
                "time s", "Pareto"):
        table.add_column(col)
    for r in rows:
        m, res = r["metrics"], r["result"]

        def fmt(key, spec=".3f", src=m):
            return f"{src[key]:{spec}}" if src.get(key) is not None else "-"

        table.add_row(str(r["id"]), r["unit"], str(r["number"]), r["status"], describe(r["method"], r["params"]) or "-",
                      fmt("forget_gap", "+.3f"), fmt("utility_drop", "+.3f"), fmt("mia_auc"),
                      f"{res.get('steps_done', '-')} ({res.get('selected_step', '-')})", fmt("wall_time_s", ".1f", r),
                      "*" if r["pareto"] else "")
    out.print(table)


def cmd_study_show(args: argparse.Namespace) -> int:
    store = _store(args, create=False)
    study = store.study(args.name)
    out.print(f"study [bold]{escape(study.name)}[/] on {escape(study.model)}: {study.status}")
    _print_study(store, args.name)
    recommendation = store.recommendation(args.name)
    if recommendation is not None:
        _print_recommendation(recommendation, study.spec["target"], study.exact_retrain)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.export import build_export, render, write_atomic

    if args.step is not None and args.trial is None:
        raise TunerError("--step needs --trial: the trial id whose checkpoint to export (`tuner study show`)")
    doc = build_export(_store(args, create=False), args.name, args.method, trial=args.trial, step=args.step)
    text = render(doc, args.format)
    if args.output:
        target = Path(args.output).expanduser()
        write_atomic(target, text)
        console.print(f"wrote {doc['unit']} trial {doc['provenance']['trial_number']} at step {doc['step']} "
                      f"({doc['status']}) to {target}")
    else:
        sys.stdout.write(text)
    return 0


# ---- parser ------------------------------------------------------------------------------------------------

def build_parser(unlearn_flags: bool = True) -> argparse.ArgumentParser:
    """The whole CLI. `unlearn_flags=False` leaves out `tuner unlearn`'s settings and hyperparameter flags:
    they are derived from the methods' declarations, which load torch (seconds the other commands need not
    wait)."""
    parser = argparse.ArgumentParser(prog="tuner", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the unlearning methods and their hyperparameters")
    p.set_defaults(func=cmd_methods)

    tb = sub.add_parser("testbed", help="the offline testbed built from the Python standard library")
    tbs = tb.add_subparsers(dest="testbed_command", required=True)
    for name, func, text in (("build", cmd_testbed_build, "build (or find in the cache) a testbed"),
                             ("show", cmd_testbed_show, "show a testbed's split and memorisation figures")):
        q = tbs.add_parser(name, help=text)
        q.add_argument("--size", default="micro", choices=["micro", "small"], help="micro: seconds, for tests; "
                       "small: a few minutes, a clear memorisation gap (default: micro)")
        q.add_argument("--seed", type=int, default=0, help="seed of the file split and of pre-training")
        if name == "build":
            q.add_argument("--force", action="store_true", help="rebuild even if cached")
        q.set_defaults(func=func)

    u = sub.add_parser("unlearn", help="run one unlearning and measure it",
                       description="Unlearn the forget set from a model with one method and one setting, print "
                       "before/after metrics, save the model (HF format) and metrics.json.")
    u.add_argument("--model", required=True, help="local HF model directory, hub id, or testbed:micro|small")
    u.add_argument("--out", help="output directory (must not exist or be empty); required unless --dry-run")
    u.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    u.add_argument("--config", help="YAML/JSON run settings (e.g. an exported recommendation); flags override")
    setting_flags: list[str] = []
    if unlearn_flags:
        from tuner import methods
        from tuner.unlearn import UnlearnConfig

        setting_flags = flags.add_model_flags(u, UnlearnConfig, skip=NOT_FLAGS)
        flags.add_hyperparameter_flags(u, methods.declared())
    u.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank instead of all weights (peft)")
    u.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2 x rank)")
    u.add_argument("--lora-target-modules", help="comma-separated module names to adapt (default: all linear "
                   "layers but the lm_head)")
    u.add_argument("--dry-run", action="store_true", help="print the memory plan and stop; exit 2 if it cannot fit")
    u.add_argument("--gpu-memory-gib", type=float, help="check the plan against a GPU with this much memory in GiB (79 "
                   "for an 80 GB H100; default: the GPU in use)")
    u.add_argument("--forget", help="forget set: text file, directory, or JSONL (testbed: built in)")
    u.add_argument("--unseen", help="unseen same-distribution set (approximate retraining)")
    u.add_argument("--retain", help="in-distribution retain set")
    u.add_argument("--general", help="general retain set")
    u.add_argument("--text-field", default="text", help="text field of JSONL rows (default: text)")
    u.add_argument("--block-size", type=int, help="tokens per block (default: testbed's, else 128)")
    u.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (runs it!)")
    u.set_defaults(func=cmd_unlearn, setting_flags=setting_flags)

    st = sub.add_parser("study", help="run, resume and inspect hyperparameter studies")
    sts = st.add_subparsers(dest="study_command", required=True)
    storage_help = "SQLAlchemy URL of the store (default: $TUNER_STORAGE or the user's SQLite file)"
    r = sts.add_parser("run", help="run a study spec (YAML) with Ray Tune and Optuna",
                       description="Run every search unit (method, retain source) of a study; flags override the spec.")
    r.add_argument("file", help="study spec, e.g. studies/quickstart.yaml")
    r.add_argument("--name", help="study name (default: the spec's)")
    r.add_argument("--storage", help=storage_help)
    r.add_argument("--address", help="Ray cluster address (default: a local Ray; also $RAY_ADDRESS)")
    r.add_argument("--trials", type=int, help="trials per search unit (overrides budget.trials)")
    r.set_defaults(func=cmd_study_run)
    q = sts.add_parser("resume", help="continue an interrupted study without repeating finished trials")
    q.add_argument("name")
    q.add_argument("--storage", help=storage_help)
    q.add_argument("--address", help="Ray cluster address")
    q.set_defaults(func=cmd_study_resume)
    v = sts.add_parser("validate", help="check a study spec without running it")
    v.add_argument("file")
    v.set_defaults(func=cmd_study_validate)
    li = sts.add_parser("list", help="list the studies in the store")
    li.add_argument("--storage", help=storage_help)
    li.set_defaults(func=cmd_study_list)
    sh = sts.add_parser("show", help="tables of a study's trials and Pareto points")
    sh.add_argument("name")
    sh.add_argument("--storage", help=storage_help)
    sh.set_defaults(func=cmd_study_show)

    ex = sub.add_parser("export", help="export a study's recommended hyperparameters with provenance",
                        description="Write the recommended run settings, expected metrics (with their spread over "
                        "nearby trials) and provenance; apply them with `tuner unlearn --config FILE`.")
    ex.add_argument("name", help="study name")
    ex.add_argument("--method", help="a method or search unit (default: the overall recommendation)")
    ex.add_argument("--trial", type=int, help="export this trial (its id in `tuner study show`) instead of a "
                    "recommendation")
    ex.add_argument("--step", type=int, help="with --trial: the evaluated checkpoint (step) to export (default: "
                    "the trial's selected one); applying the file ends the run at that step")
    ex.add_argument("--format", choices=["yaml", "json"], default="yaml")
    ex.add_argument("-o", "--output", help="output file (default: standard output)")
    ex.add_argument("--storage", help=storage_help)
    ex.set_defaults(func=cmd_export)

    from dashboards.cli import add_parser as add_dashboard_parser

    add_dashboard_parser(sub)
    return parser


def _resume_hint(args: argparse.Namespace) -> str:
    """The command that continues the study this command ran, or "" for commands that run none."""
    from tuner.store import Store, default_url, normalise_url, safe_url

    name, url = getattr(args, "study_name", None), getattr(args, "store_url", None)
    if not name or not url:
        return ""
    try:
        if name not in Store(url, create=False).study_names():
            return ""  # stopped before the study was stored: nothing to resume, run it again
    except TunerError:
        return ""
    storage = "" if url == normalise_url(default_url()) else f" --storage {safe_url(url)}"
    return f"; resume with: tuner study resume {name}{storage}"


def _log_folder(args: argparse.Namespace) -> Path:
    """Beside the SQLite store the command used; for PostgreSQL (or none) beside the default store."""
    from sqlalchemy.engine import make_url

    from tuner.store import default_url

    for url in (getattr(args, "store_url", None), default_url()):
        try:
            parsed = make_url(url) if url else None
        except Exception:  # noqa: BLE001 - an unparseable URL: try the next place
            continue
        if parsed is not None and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            return Path(parsed.database).expanduser().resolve().parent
    return Path(tempfile.gettempdir())


def _write_traceback(args: argparse.Namespace, err: BaseException) -> Path:
    """The full traceback of an unexpected error, for a bug report: a log file beside the store."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(err))
    for folder in (_log_folder(args), Path(tempfile.gettempdir())):
        path = folder / f"tuner-error-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(f"tuner {' '.join(sys.argv[1:])}\n{text}", encoding="utf-8")
            return path
        except OSError:
            continue
    return Path("(not written)")


def _summary(err: BaseException) -> str:
    """"Type: first line" of the error at the root of the chain (Ray Tune wraps a callback's error in a
    TuneError whose text is a whole traceback; its last line names the error)."""
    root = err
    for _ in range(20):  # a chain is short; the bound only guards against a cycle
        if (root.__cause__ or root.__context__) is None:
            break
        root = root.__cause__ or root.__context__
    lines = [ln.strip() for ln in str(root).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1][:300]
    return f"{type(root).__name__}: {lines[0][:300] if lines else '(no message)'}"


def _hide_password(text: str, url: str | None) -> str:
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password if url else None
    except Exception:  # noqa: BLE001 - not a URL: nothing to hide
        return text
    return text.replace(str(password), "***") if password else text


def _say(text: str) -> None:
    console.print(escape(one_line(text)), highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Tune hyperparameters for unlearning pre-trained causal LMs."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(unlearn_flags=argv[:1] == ["unlearn"]).parse_args(argv)
    try:
        return args.func(args)
    except TunerError as err:
        console.print(f"[red]error:[/] {escape(one_line(str(err)))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGINT/SIGTERM to a study (tuner.orchestrator.StudyStopped)
        signum = getattr(err, "signum", 2)
        hint = _resume_hint(args)
        _say(f"stopped ({str(err) or 'SIGINT'})" + (f": trials stopped, study marked interrupted{hint}" if hint else ""))
        return 128 + signum
    except Exception as err:  # noqa: BLE001 - anything unexpected: one line, the log, the resume command
        log = _write_traceback(args, err)
        what = _hide_password(_summary(err), getattr(args, "store_url", None))
        _say(f"error: unexpected {what}{_resume_hint(args)}; traceback: {log}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
