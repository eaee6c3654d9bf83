"""Progress for logs. When standard output is no terminal (nohup, Slurm, Ray job logs, CI) rich's bars show
nothing until the command ends, so a long run looks hung; there `tuner unlearn` and `tuner study run|resume`
print plain `key=value` lines instead: one at each evaluation or trial event, and every row again at least
every `--progress-every` seconds. A figure that was not measured reads `"not measured"`, never a number."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import nullcontext
from typing import Any, TextIO

PROGRESS_EVERY_S = 30.0  # the default of --progress-every
NOT_MEASURED = '"not measured"'


def wanted() -> bool:
    """Plain lines when standard output goes to a file or pipe; on a terminal the rich bars stay."""
    return not sys.stdout.isatty()


def figure(value: float | None, spec: str = "+.4f") -> str:
    """A measured figure as text, or `"not measured"` where it was not measured."""
    return NOT_MEASURED if value is None else f"{value:{spec}}"


def quoted(text: str) -> str:
    """A value with spaces as one logfmt field."""
    return '"' + text.replace('"', "'") + '"' if " " in text or '"' in text else text


def log_lines(prefix: str, every: float, enabled: bool = True) -> LogLines | nullcontext[None]:
    """The command's LogLines when standard output is no terminal (and `enabled`), else a context of None."""
    return LogLines(prefix, every) if enabled and wanted() else nullcontext()


class LogLines:
    """Rows of fields (one per run or search unit), each printed as one flushed line that ends in the elapsed
    time: a row at once when it is set with `now=True`, and any row not printed for `every` seconds by a
    daemon thread, so that a long step, evaluation or trial never leaves the log silent."""

    def __init__(self, prefix: str, every: float = PROGRESS_EVERY_S, stream: TextIO | None = None) -> None:
        self.prefix, self.every, self.stream = prefix, every, stream or sys.stdout
        self.started = time.monotonic()
        self.rows: dict[str, dict[str, str]] = {}
        self.printed: dict[str, float] = {}  # row -> when it was last printed
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="tuner-progress-lines", daemon=True)

    def __enter__(self) -> LogLines:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """No more lines (the command prints its results next)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def set(self, row: str, fields: dict[str, str], now: bool = False) -> None:
        with self.lock:
            self.rows[row] = dict(fields)
            self.printed.setdefault(row, self.started)
            if now:
                self._print(row)

    def note(self, fields: dict[str, str]) -> None:
        """A line printed once (an event, not a row kept up to date)."""
        with self.lock:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            self.stream.write(f"{self.prefix} {text} elapsed={time.monotonic() - self.started:.0f}s\n")
            self.stream.flush()

    def _beat(self) -> None:
        wait = self.every
        while not self.stopped.wait(wait):
            with self.lock:
                now = time.monotonic()
                for row in self.rows:
                    if now - self.printed[row] >= self.every:
                        self._print(row)
                due = [self.printed[row] + self.every for row in self.rows]
            wait = max(0.05, min(due, default=now + self.every) - time.monotonic())

    def _print(self, row: str) -> None:
        now = time.monotonic()
        fields = " ".join(f"{k}={v}" for k, v in self.rows[row].items())
        self.stream.write(f"{self.prefix} {fields} elapsed={now - self.started:.0f}s\n")
        self.stream.flush()
        self.printed[row] = now


class UnlearnLog:
    """`tuner unlearn`'s line: phase, step, loss, and the latest evaluation's forget gap and utility drop (the
    retain NLL against the step-0 point, which scored the same blocks)."""

    ROW = "run"

    def __init__(self, lines: LogLines) -> None:
        self.lines, self.start = lines, None
        self.fields = {"phase": "loading"}
        lines.set(self.ROW, self.fields)

    def _set(self, now: bool = False, **fields: str) -> None:
        self.fields.update(fields)
        order = ("phase", "step", "loss", "eval_step", "forget_gap", "utility_drop")
        self.lines.set(self.ROW, {k: self.fields[k] for k in order if k in self.fields}, now=now)

    def phase(self, name: str) -> None:
        self._set(phase=quoted(name))

    def finish(self) -> None:
        """The last line, before the results."""
        self._set(now=True, phase="done")
        self.lines.close()

    def on_start(self, total: int, point: dict[str, float]) -> None:
        self.start = point
        self.fields.update(phase="unlearning", step=f"0/{total}")
        self.on_eval(point)

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None:
        self._set(step=f"{step}/{total}", loss=figure(logs.get("loss"), ".4f"))

    def on_eval(self, point: dict[str, Any]) -> None:
        from tuner.results.candidates import curve_estimate

        curve = curve_estimate(point, self.start, subsampled=True)
        measured, errors = curve["metrics"], curve["errors"]
        self._set(now=True, eval_step=str(point["step"]),
                  forget_gap=estimate(measured.get("forget_gap"), errors.get("forget_gap")),
                  utility_drop=estimate(measured.get("utility_drop"), errors.get("utility_drop")))


def estimate(value: float | None, se: float | None) -> str:
    """A figure as text; one scored on a subsample reads as the estimate it is, with its standard error."""
    return figure(value) if value is None or se is None else quoted(f"{value:+.4f} ± {se:.4f} (subsample estimate)")


class StudyLog:
    """`tuner study run|resume`'s lines, one per search unit: trials finished of its budget, running, failed,
    and the closest forget gap so far (with that trial's utility drop); fed by the study's `on_event`. A unit's
    note (its calibration) is printed once, in a line of its own with the unit's fields."""

    def __init__(self, lines: LogLines) -> None:
        self.lines = lines

    def __call__(self, unit: str, info: dict[str, Any]) -> None:
        best = info.get("best") or {}
        fields = {"unit": unit, "finished": f"{info['finished']}/{info['budget']}", "running": str(info["running"]),
                  "failed": str(info["failed"]),
                  "best_gap": figure(best.get("forget_gap")) if best else '"none yet"',
                  "best_utility_drop": figure(best.get("utility_drop")) if best else '"none yet"'}
        if info.get("waiting"):
            fields["waiting"] = quoted(info["waiting"])
        if info.get("note"):  # once, with the unit's fields (the row itself is printed again later)
            self.lines.note({**fields, "note": quoted(info["note"])})
        self.lines.set(unit, fields, now=not info.get("note"))
