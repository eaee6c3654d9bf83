"""The `tuner` command line. User mistakes end as one line on stderr and exit code 2.

This module builds the parser (every command, flag and help text) and dispatches to the command modules:
`catalogue` (methods, testbed), `unlearn`, `study` (study commands, export); `crash` ends failed commands.
"""

from __future__ import annotations

import argparse
import sys

from tuner.cli.catalogue import cmd_methods, cmd_testbed_build, cmd_testbed_show
from tuner.cli.crash import run
from tuner.cli.logprogress import PROGRESS_EVERY_S
from tuner.cli.study import cmd_export, cmd_study_list, cmd_study_resume, cmd_study_run, cmd_study_show, cmd_study_validate
from tuner.cli.unlearn import NOT_FLAGS, cmd_unlearn
from tuner.core import flags


def seconds(text: str) -> float:
    """A positive number of seconds (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress-every", type=seconds, default=PROGRESS_EVERY_S, metavar="SECONDS",
                        help="when standard output is not a terminal (nohup, Slurm, CI logs): print a plain progress "
                        f"line at least this often (default {PROGRESS_EVERY_S:g})")


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
        from tuner.engine import methods
        from tuner.engine.unlearn import UnlearnConfig

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
    add_progress_flag(u)
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
    add_progress_flag(r)
    r.set_defaults(func=cmd_study_run)
    q = sts.add_parser("resume", help="continue an interrupted study without repeating finished trials")
    q.add_argument("name")
    q.add_argument("--storage", help=storage_help)
    q.add_argument("--address", help="Ray cluster address")
    add_progress_flag(q)
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
    sh.add_argument("--json", action="store_true", help="print the study as one JSON document (trials, "
                    "calibrations, parameter importance, recommendation) instead of tables")
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


def main(argv: list[str] | None = None) -> int:
    """Tune hyperparameters for unlearning pre-trained causal LMs."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(unlearn_flags=argv[:1] == ["unlearn"]).parse_args(argv)
    return run(args.func, args)
