"""The one exception type a user can cause and fix; the CLI prints it as a single line."""

from __future__ import annotations

import re

from pydantic import ValidationError

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


class TunerError(Exception):
    """A mistake in the user's input (a file, a field, a flag): shown as one line, exit code 2."""


def one_line(text: str) -> str:
    """Line breaks and other control characters (from a user's file names or values) shown escaped, so an
    error stays one line and cannot forge further lines of output."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def describe_validation_error(err: ValidationError, source: str) -> str:
    """Name every bad field by its path, so the user can find it in their YAML or flags."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        # a check across fields names its own field path in its message
        parts.append(f"{loc}: {item['msg']}" if loc else item["msg"].removeprefix("Value error, "))
    return one_line(f"{source}: " + "; ".join(parts))
