"""What the commands print: the consoles, progress bars and tables, kept apart from the work that fills them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tuner.core.metrics import TABLE
from tuner.core.metrics import get as metric
from tuner.core.status import DIVERGED, STOPPED_COLLAPSED, STOPPED_HOPELESS

# Piped output (logs, CI) gets wide tables instead of rich's 80-column fallback.
console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
out = Console() if sys.stdout.isatty() else Console(width=160)


def progress() -> Progress:
    """Transient bars on stderr for the steps of one command (testbed build, model load, unlearning)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=True)


def study_progress() -> Progress:
    """The bars of a running study; they stay on screen when it finishes."""
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), console=console)


class Bars:
    """A named rich task per label, fed by the (label, done, total) callbacks of the library."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.tasks = progress, {}

    def __call__(self, label: str, done: int, total: int, info: str = "") -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total, info="")
        self.progress.update(self.tasks[label], completed=done, total=total, info=info)


class StudyBars:
    """One progress bar per search unit: trials finished, running, failed, and the best point so far."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.tasks = progress, {}

    def __call__(self, unit: str, info: dict[str, Any]) -> None:
        if info.get("note"):  # a line of its own above the bars (a unit's calibration)
            self.progress.console.print(f"{escape(unit)}: {escape(info['note'])}", highlight=False, soft_wrap=True)
        best = info.get("best")
        text = f"running {info['running']}, failed {info['failed']}"
        if info.get("waiting"):
            text += f"; {info['waiting']}"
        if best:
            drop = best.get("utility_drop")
            text += (f"; closest |gap| {abs(best['forget_gap']):.3f} (utility drop "
                     + (f"{drop:+.3f})" if drop is not None else "not measured)"))
        if unit not in self.tasks:
            self.tasks[unit] = self.progress.add_task(unit, total=info["budget"], info="")
        self.progress.update(self.tasks[unit], completed=info["finished"], info=text)


# ---- tuner methods, tuner testbed --------------------------------------------------------------------------

def print_methods() -> None:
    from tuner.engine import methods

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


def print_manifest(root: Path) -> None:
    from tuner.engine import testbed

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


# ---- tuner unlearn -----------------------------------------------------------------------------------------

def cell(value: float | None, spec: str) -> str:
    """A figure for a table: '-' when it was not measured (never 0)."""
    return "-" if value is None else format(value, spec)


def metric_table(result, retrain: dict[str, float] | None) -> Table:
    """Before/after metrics; the exact-retrain column only when there is a retrain model for this forget set."""
    table = Table(title=f"{result.config['method']}: {result.status}")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("unlearned", justify="right")
    if retrain is not None:
        table.add_column("exact retrain", justify="right")
    after = result.metrics or {}
    for key in TABLE:
        if key not in result.baseline and key not in after:
            continue
        spec = metric(key)
        cells = [spec.label, cell(result.baseline.get(key), spec.fmt), cell(after.get(key), spec.fmt)]
        if retrain is not None:
            cells.append(cell(retrain.get(key), spec.fmt))
        table.add_row(*cells)
    if after.get("privleak_reference_auc") is not None:
        table.caption = (f"privleak relative to min-k AUC {after['privleak_reference_auc']:.3f} ("
                         + ("the exact retrain" if retrain is not None else "the approximate target") + "); "
                         f"Min-K% and MinK++ over the least likely {after.get('mink_k', 0):.0%} of tokens")
    return table


def memory_text(mem: dict[str, Any]) -> str:
    if not mem:
        return ""
    text = f"; memory plan {mem['plan_gib']['total']:.2f} GiB"
    return text + (f", measured peak {mem['peak_gib']:.2f} GiB" if mem.get("peak_gib") is not None else "")


def print_result(result, report: dict, retrain: dict | None, target: Path) -> None:
    out.print(metric_table(result, retrain))
    env = result.environment
    out.print(f"steps {result.steps_done}/{result.planned_steps}, kept step {result.selected_step}"
              + (f", reached the approximate-retraining point at step {result.stop_step}" if result.stop_step else "")
              + f"; {result.wall_time_s:.1f} s on {env['device']}, effective batch "
              f"{env['effective_batch']}, {result.train_tokens:,} training tokens")
    out.print(f"precision {env['precision']} (weights {env['weights_dtype']}, compute {env['compute_dtype']}), "
              f"optimizer {env['optimizer']}" + (f", LoRA r={env['lora']['r']}" if env.get("lora") else "")
              + memory_text(env.get("memory") or {}))
    if result.status == DIVERGED:
        out.print(f"[red]diverged[/]: {result.reason}; no model saved")
    elif result.metrics is not None:
        if result.status in (STOPPED_HOPELESS, STOPPED_COLLAPSED):
            out.print(f"[yellow]{result.status}[/]: {result.reason}")
        m = result.metrics
        out.print(f"utility drop (retain NLL vs original): {m.get('utility_drop', float('nan')):+.4f}")
        if "targets" in report:
            t = report["targets"]
            out.print(f"target check: approximate target (unseen NLL) {t['approximate_forget_nll']:.4f}, "
                      f"exact-retrain forget NLL {t['exact_retrain_forget_nll']:.4f}; unlearned forget NLL is "
                      f"{t['distance_to_approximate']:+.4f} from the approximate and {t['distance_to_exact']:+.4f} "
                      "from the exact target")
    out.print(f"saved to {target}" + (" (model/ and metrics.json)" if result.metrics is not None else " (metrics.json)"))


# ---- tuner study -------------------------------------------------------------------------------------------

def print_study(store, name: str) -> None:
    from tuner.engine.methods import describe

    rows = store.trials(name)
    table = Table(title=f"trials of {escape(name)}")
    for col in ("id", "unit", "#", "status", "setting", "forget gap", "utility drop", "MIA AUC", "privleak %",
                "forget EM", "steps (kept)", "time s", "Pareto"):
        table.add_column(col)
    for r in rows:
        m, res = r["metrics"], r["result"]
        figures = [cell(m.get(key), spec) for key, spec in (("forget_gap", "+.3f"), ("utility_drop", "+.3f"),
                                                             ("mia_auc", ".3f"), ("privleak", "+.1f"),
                                                             ("forget_em", ".3f"))]
        table.add_row(str(r["id"]), r["unit"], str(r["number"]), r["status"], describe(r["method"], r["params"]) or "-",
                      *figures, f"{res.get('steps_done', '-')} ({res.get('selected_step', '-')})",
                      cell(r.get("wall_time_s"), ".1f"), "*" if r["pareto"] else "")
    out.print(table)


def print_calibrations(store, name: str) -> None:
    """Each unit's lr calibration: where the forget gap moved and reached the band, where the utility
    collapsed, the lr window its search drew from (or why it has none) and the guideline points it ran first."""
    from tuner.results.calibration import lr_text

    found = store.calibrations(name)
    if not found:
        return
    table = Table(title="learning-rate calibration per search unit (lr rising step by step over the declared range)")
    for col in ("unit", "status", "steps", "declared lr", "gap moved at", "reached band at", "utility collapsed at",
                "searched lr", "guideline points (epochs: lr)", "time s"):
        table.add_column(col)
    for unit, c in found.items():
        f, rng, window = c.get("finding") or {}, c.get("range") or {}, c.get("window")
        table.add_row(escape(unit), c["status"], str(c.get("steps", "-")),
                      f"{lr_text(rng['low'])}..{lr_text(rng['high'])}" if rng else "-",
                      *(lr_text(f.get(k)) if f else "-" for k in ("move_lr", "cross_lr", "collapse_lr")),
                      f"{lr_text(window['low'])}..{lr_text(window['high'])}" if window else "declared" if
                      c["status"] != "no_window" else "not searched",
                      ", ".join(f"{p['epochs']}: {lr_text(p['lr'])}" for p in c.get("guideline") or []) or "-",
                      f"{c['time_s']:.1f}" if c.get("time_s") is not None else "-")
    out.print(table)
    for unit, c in found.items():
        out.print(f"calibration of {escape(unit)}: {escape(c['summary'])}", highlight=False, soft_wrap=True)


def print_importance(store, name: str) -> None:
    """Per search unit and objective, the hyperparameters that explained most of its variation (PED-ANOVA over
    the unit's finished trials, stored at the study's end); a unit without such a figure gets a line saying why."""
    found = store.importances(name)
    measured = {unit: record for unit, record in found.items() if "note" not in record}
    if measured:
        table = Table(title="parameter importance per objective (PED-ANOVA share over the unit's finished trials)")
        for col in ("unit", "trials", "objective", "share of its variation"):
            table.add_column(col)
        for unit, record in measured.items():
            for objective, shares in record["objectives"].items():
                table.add_row(escape(unit), str(record["trials"]), escape(objective),
                              ", ".join(f"{p} {v:.2f}" for p, v in shares.items()) or "did not vary")
        out.print(table)
    for unit, record in found.items():
        if "note" in record:
            out.print(f"parameter importance of {escape(unit)}: {escape(record['note'])}", highlight=False,
                      soft_wrap=True)


def print_recommendation(rec: dict[str, Any], target: dict[str, float], exact: dict[str, float] | None) -> None:
    from tuner.engine.methods import describe
    from tuner.results.recommend import robustness_line

    table = Table(title="recommendation per search unit (target: |forget gap| ≤ "
                  f"{target['gap_tolerance']}; robust = neighbours also succeed)")
    for col in ("unit", "status", "trial", "step", "setting", "forget gap", "utility drop", "privleak %",
                "forget EM", "robustness", "window (decades)", "reason"):
        table.add_column(col)
    for unit, r in rec["units"].items():
        m = r.get("metrics") or {}
        table.add_row(unit, r["status"], str(r.get("number", "-")), str(r.get("step", "-")),
                      describe(unit.split("@")[0], r.get("params") or {}) or "-",
                      cell(m.get("forget_gap"), "+.3f"), cell(m.get("utility_drop"), "+.3f"),
                      cell(m.get("privleak"), "+.1f"), cell(m.get("forget_em"), ".3f"),
                      cell(r.get("robustness"), ".2f"), f"{r.get('window_width', 0):.2f}", escape(r["reason"]))
    out.print(table)
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
