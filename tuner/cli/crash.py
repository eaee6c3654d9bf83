"""How a command ends when it does not succeed: a user mistake in one line (exit 2), Ctrl+C with the command that
resumes the study (128 + signal), anything unexpected in one line with a traceback log beside the store (exit 1)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rich.markup import escape

from tuner.cli.render import console
from tuner.core.errors import TunerError, one_line


def run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The command's exit status, whatever it raises."""
    try:
        return command(args)
    except TunerError as err:
        console.print(f"[red]error:[/] {escape(one_line(str(err)))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGINT/SIGTERM to a study (tuner.study.orchestrator.StudyStopped)
        signum = getattr(err, "signum", 2)
        hint = _resume_hint(args)
        _say(f"stopped ({str(err) or 'SIGINT'})" + (f": trials stopped, study marked interrupted{hint}" if hint else ""))
        return 128 + signum
    except Exception as err:  # noqa: BLE001 - anything unexpected: one line, the log, the resume command
        from tuner.store import mask_password

        log = _write_traceback(args, err)
        what = mask_password(_summary(err), getattr(args, "store_url", None))
        _say(f"error: unexpected {what}{_resume_hint(args)}; traceback: {log}")
        return 1


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


def _say(text: str) -> None:
    console.print(escape(one_line(text)), highlight=False, soft_wrap=True)
