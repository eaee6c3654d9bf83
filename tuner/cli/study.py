"""`tuner study run|resume|validate|list|show` and `tuner export`: the commands on studies and their store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from tuner.cli.logprogress import StudyLog, log_lines
from tuner.cli.render import (
    StudyBars,
    console,
    out,
    print_calibrations,
    print_importance,
    print_recommendation,
    print_study,
    study_progress,
)
from tuner.core.errors import TunerError


def _store(args: argparse.Namespace, spec_storage: str | None = None, create: bool = True):
    """create=False: commands that only read (or continue) studies never create a store or its tables."""
    from tuner.store import Store, default_url, normalise_url

    args.store_url = normalise_url(args.storage or spec_storage or default_url())  # for the error paths in main()
    return Store(args.storage or spec_storage, create=create)


def _run_study(spec, text: str, store, resume: bool, progress_every: float) -> int:
    from tuner.store import default_url, normalise_url, safe_url
    from tuner.study.orchestrator import run_study

    with study_progress() as progress, log_lines(f"[study {spec.name}]", progress_every) as lines:
        bars, log = StudyBars(progress), StudyLog(lines) if lines else None

        def on_event(unit: str, info: dict) -> None:
            bars(unit, info)
            if log is not None:
                log(unit, info)

        try:
            outcome = run_study(spec, text, store, resume=resume, on_event=on_event)
        except BaseException:
            progress.live.transient = True  # a stopped or failed study ends in its one line, not the bars
            raise
    print_calibrations(store, spec.name)
    print_study(store, spec.name)
    recommendation = outcome.recommendation
    out.print(f"study [bold]{escape(outcome.name)}[/] finished; store: {safe_url(store.url)}")
    out.print("Pareto front size per method: " + ", ".join(f"{u} {n}" for u, n in outcome.pareto_sizes.items()))
    print_recommendation(recommendation, spec.target.model_dump(), store.study(spec.name).exact_retrain)
    storage_flag = "" if store.url == normalise_url(default_url()) else f" --storage {safe_url(store.url)}"
    out.print(f"dashboard: tuner dashboard{storage_flag}  (then open http://127.0.0.1:8050/study/{spec.name}); "
              f"export: tuner export {spec.name}{storage_flag} -o recommended.yaml")
    return 0


def _warn_remote_code(spec) -> None:
    if spec.trust_remote_code:
        console.print(f"[yellow]warning:[/] trust_remote_code: true runs Python code shipped with model "
                      f"'{escape(spec.model)}' in every trial", highlight=False, soft_wrap=True)


def _study_plan(spec):
    """The study's memory plan (None when a hub model's config cannot be read here, e.g. offline: then each
    trial checks the plan against its own GPU before loading)."""
    from tuner.engine.memory import plan_study

    try:
        return plan_study(spec)
    except TunerError:
        if Path(spec.model).expanduser().exists() or spec.model.startswith("testbed:"):
            raise
        console.print(f"[yellow]note:[/] no memory plan: the config of hub model '{escape(spec.model)}' is not in the "
                      "local HF cache (`tuner unlearn --model ID --dry-run` fetches it); each trial checks its GPU",
                      highlight=False, soft_wrap=True)
        return None


def cmd_study_run(args: argparse.Namespace) -> int:
    from tuner.study.spec import check_inputs, load_spec

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
    return _run_study(spec, text, store, resume=False, progress_every=args.progress_every)


def cmd_study_resume(args: argparse.Namespace) -> int:
    from tuner.study.spec import stored_spec

    args.study_name = args.name
    store = _store(args, create=False)
    study = store.study(args.name)
    spec = stored_spec(study.spec, f"stored spec of '{args.name}'")
    _warn_remote_code(spec)
    if args.address:
        spec.ray_address = args.address
    return _run_study(spec, study.spec_text, store, resume=True, progress_every=args.progress_every)


def cmd_study_validate(args: argparse.Namespace) -> int:
    from tuner.engine.memory import plan_lines as memory_lines
    from tuner.study.spec import check_inputs, load_spec, unit_name

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


def cmd_study_list(args: argparse.Namespace) -> int:
    store = _store(args, create=False)
    table = Table("name", "model", "status", "finished trials", "created")
    for row in store.list_studies():
        table.add_row(escape(row["name"]), escape(row["model"]), row["status"], str(row["trials"]),
                      f"{row['created_at']:%Y-%m-%d %H:%M}")
    out.print(table)
    return 0


def cmd_study_show(args: argparse.Namespace) -> int:
    store = _store(args, create=False)
    study = store.study(args.name)
    if args.json:
        print(study_json(store, study))
        return 0
    out.print(f"study [bold]{escape(study.name)}[/] on {escape(study.model)}: {study.status}")
    print_calibrations(store, args.name)
    print_study(store, args.name)
    print_importance(store, args.name)
    recommendation = store.recommendation(args.name)
    if recommendation is not None:
        print_recommendation(recommendation, study.spec["target"], study.exact_retrain)
    return 0


def study_json(store, study) -> str:
    """`tuner study show --json`: what the tables show, as stored, for scripts. A figure that was not measured
    is null (never 0); NaN and infinities are null too, so any JSON parser reads it."""
    import json

    from tuner.store import finite_json

    doc = {"format": "unlearn-tuner/study@1", "name": study.name, "model": study.model, "status": study.status,
           "objectives": study.spec.get("objectives"), "target": study.spec.get("target"),
           "baseline": study.baseline, "exact_retrain": study.exact_retrain,
           "calibrations": store.calibrations(study.name), "importance": store.importances(study.name),
           "trials": store.trials(study.name), "recommendation": store.recommendation(study.name)}
    return json.dumps(finite_json(doc), indent=2, default=str, allow_nan=False)


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.results.export import build_export, render, write_atomic

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
